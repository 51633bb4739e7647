"""Validates compose files against the Compose specification's JSON schema.

Usage: check-compose.py SCHEMA.json FILE.yaml...  (make check-deploy runs it with the schema
that docker-compose 1.29.2 ships, in the kubernetes-validate venv, which has jsonschema and
PyYAML). Exits 1 naming each error's path.
"""
import json
import sys

import jsonschema
import yaml


def main() -> int:
    schema = json.load(open(sys.argv[1]))
    validator = jsonschema.Draft7Validator(schema)
    failed = 0
    for path in sys.argv[2:]:
        # safe_load applies YAML merge keys (`<<: *anchor`) as Compose does.
        doc = yaml.safe_load(open(path))
        for e in validator.iter_errors(doc):
            failed += 1
            print(f"{path}: {'/'.join(map(str, e.path)) or '.'}: {e.message}")
        if not failed:
            print(f"{path}: valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
