-- Job leases: the process running a job (its instance) and until when (unix ms) it holds it;
-- renewed by its heartbeat, taken over by another process once expired.
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires INTEGER;
