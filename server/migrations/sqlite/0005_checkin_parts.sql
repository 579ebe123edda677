-- The highest check-in part a draft took (server/checkin.ts, holdPart): a device
-- numbers its parts, rising, and a part at or below this one is refused, so that a
-- request still running after a later one cannot put older content over newer.
ALTER TABLE versions ADD COLUMN checkin_part INTEGER NOT NULL DEFAULT 0;
