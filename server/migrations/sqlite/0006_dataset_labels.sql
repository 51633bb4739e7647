-- Classification datasets: examples per label, a JSON object {label: count}; NULL for the
-- other formats (and for rows written before this migration).
ALTER TABLE datasets ADD COLUMN label_counts TEXT;
