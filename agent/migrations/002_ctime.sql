-- 002: the file's ctime when it was hashed. The kernel updates ctime on every write and
-- user space cannot set it, so an unchanged ctime proves the bytes are still the hashed
-- ones and an upload need not hash them again. NULL (older rows): hash as before.
ALTER TABLE attachments ADD COLUMN ctime_ns INTEGER;
