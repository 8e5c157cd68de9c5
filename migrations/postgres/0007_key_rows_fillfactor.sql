-- Ordered keys' rows are updated in place all day long: `key_sequences` once per committing
-- transaction of the key, `key_delivery` once per record delivered. Room left on each page lets
-- those updates be HOT (the new row version on the same page, no new index entry), so the
-- primary keys do not grow with every update between vacuums. Pages written from now on.
ALTER TABLE journaled.key_sequences SET (fillfactor = 50);
ALTER TABLE journaled.key_delivery SET (fillfactor = 50);
