-- Blobs are named by BLAKE3 from this version on. The blobs a store already refers to were
-- named by SHA-256 and stay where they are (`sha256/<hex>` in the blob store); their ids
-- become `sha256:<hex>`, so they are still found, and checked with the hash that named them.
UPDATE run SET model_sha = 'sha256:' || model_sha
    WHERE model_sha <> '' AND model_sha NOT LIKE 'sha256:%';
UPDATE run SET state_sha = 'sha256:' || state_sha
    WHERE state_sha <> '' AND state_sha NOT LIKE 'sha256:%';
UPDATE accepted SET sha256 = 'sha256:' || sha256 WHERE sha256 NOT LIKE 'sha256:%';
UPDATE round_blobs SET shas = 'sha256:' || REPLACE(shas, ' ', ' sha256:')
    WHERE shas <> '' AND shas NOT LIKE 'sha256:%';
