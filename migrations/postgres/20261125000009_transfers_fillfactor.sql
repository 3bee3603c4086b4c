-- Room on each page of the transfers table for the next version of its rows. A transfer's
-- row is updated about three times; an update that changes no indexed column and finds room
-- on its row's page is heap-only: it writes no index entry (the primary key is a random
-- UUID, so each entry lands on a page of its own, logged whole after a checkpoint) and
-- leaves nothing for vacuum to clean out of the indexes. With every page filled by inserts,
-- as it was, 4% of the updates were heap-only; with this room, 16% (the others change the
-- status the timers' indexes select on), and the workers wrote 8–12% less WAL per transfer
-- (BENCHMARKS.md). Pages written before this migration keep the room they had.
ALTER TABLE coordinator.transfers SET (fillfactor = 70);
