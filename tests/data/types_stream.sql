-- Changes streamed after the copy (tests/types_corpus.rs): inserts of copies
-- of every corpus row, updates that leave TOASTed values unchanged, updates
-- of everything, deletes, rows moving between partitions.
INSERT INTO types_schema.builtins
    SELECT (jsonb_populate_record(b, jsonb_build_object('id', b.id + :off))).* FROM types_schema.builtins b WHERE b.id < 100;
UPDATE types_schema.builtins SET c_int4 = c_int4 / 2 + 1, c_num = c_num + 1 WHERE id IN (1, 2, 3);
UPDATE types_schema.builtins SET c_text = 'changed', c_json = '{"x": 1}', c_point = '(9,9)', c_xml = '<b/>',
    c_big = c_big || 'tail' WHERE id = :off + 1;
DELETE FROM types_schema.builtins WHERE id = :off + 2;

INSERT INTO types_schema.builtins_text
    SELECT (jsonb_populate_record(b, jsonb_build_object('id', b.id + :off))).* FROM types_schema.builtins_text b WHERE b.id < 100;
UPDATE types_schema.builtins_text SET c_int4 = 7, mood = 'elated' WHERE id IN (1, 2, 3, 4);
UPDATE types_schema.builtins_text SET c_polygon = '((1,1),(2,2),(3,1))', c_json = '[1]', c_tsq = 'x' WHERE id = :off + 1;
DELETE FROM types_schema.builtins_text WHERE id IN (:off + 2, :off + 4);

INSERT INTO types_schema.arrays
    SELECT (jsonb_populate_record(a, jsonb_build_object('id', a.id + :off))).* FROM types_schema.arrays a WHERE a.id < 100;
UPDATE types_schema.arrays SET a_int2d = '{{5,6},{7,8}}', a_mood = '{happy}' WHERE id = 1;
DELETE FROM types_schema.arrays WHERE id = :off + 3;

INSERT INTO "Tÿpes ""Ω"""."Ünïcode Tåble"
    SELECT (jsonb_populate_record(u, jsonb_build_object('Ïd', u."Ïd" + :off))).* FROM "Tÿpes ""Ω"""."Ünïcode Tåble" u WHERE u."Ïd" < 100;
UPDATE "Tÿpes ""Ω"""."Ünïcode Tåble" SET d_posint = 42, c_addr.zip = 7, r_float = '(,3]', x_hstore = x_hstore || 'z=>1' WHERE "Ïd" = 1;
DELETE FROM "Tÿpes ""Ω"""."Ünïcode Tåble" WHERE "Ïd" = :off + 2;

INSERT INTO types_schema.computed (price, qty, note) VALUES (2.5, 4, 'streamed');
INSERT INTO types_schema.computed (other, price, qty) VALUES (-5, 1, 1);
UPDATE types_schema.computed SET price = price + 1 WHERE id <= 2;
DELETE FROM types_schema.computed WHERE id = 3;

UPDATE types_schema.by_index SET v = '{"changed": true}' WHERE code = 'c1';
UPDATE types_schema.by_index SET code = 'renamed' WHERE code = 'c2';
DELETE FROM types_schema.by_index WHERE code = 'c3';
INSERT INTO types_schema.by_index VALUES (:off + 11, 'c' || (:off + 11), NULL, NULL);

UPDATE types_schema.events SET k = k + 100 WHERE id <= 5;
UPDATE types_schema.events SET k = 250 WHERE id = 6;
UPDATE types_schema.events SET k = 5 WHERE id = 20;
DELETE FROM types_schema.events WHERE id = 7;
INSERT INTO types_schema.events VALUES (:off, 199, 'new');

INSERT INTO types_schema.animals VALUES (:off + 3, 'owl');
INSERT INTO types_schema.dogs VALUES (:off + 4, 'fido', 'arf');
UPDATE types_schema.animals SET name = name || '!';
DELETE FROM types_schema.dogs WHERE id = 2;

INSERT INTO types_schema.reordered (id, a, b, c) VALUES (:off + 6, 'a6', 6, NULL);
UPDATE types_schema.reordered SET b = -b, c = NULL WHERE id = 1;
DELETE FROM types_schema.reordered WHERE id = 2;

INSERT INTO types_schema.floats SELECT id + :off, f8 * 3, f4 * 3, f8s || (f8 * 7), ROW((cx).r / 3, (cx).i * 1.1::float8)::types_schema.complex
    FROM types_schema.floats WHERE id < 100;
UPDATE types_schema.floats SET f8 = f8 * 1.1, cx.r = 0.7::float8 + 0.1 WHERE id = 1;
