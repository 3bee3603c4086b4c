-- A record is one row by its message id alone. Its topic/partition/offset may repeat: a
-- broker's offsets start again at 0 when a topic is made anew (deleted and created, a new
-- cluster, the embedded broker of a restarted `twophase dev`), and the records written then are
-- new messages. Unique on the position, they were taken for ones already stored and dropped.
ALTER TABLE audit.audit_log DROP CONSTRAINT audit_log_once_per_record;
