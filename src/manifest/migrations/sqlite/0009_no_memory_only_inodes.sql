-- Inode numbers of one mount's memory (from 2^62 up, src/manifest/inodes.rs) that an earlier
-- cutoverfs wrote into rows: every mount hands out the same ones for other paths, so a row
-- holding one could make the kernel open another file under its number. Such rows give the
-- number up; the mount numbers them again from the counter.
UPDATE entries SET ino = NULL WHERE ino >= 4611686018427387904;
