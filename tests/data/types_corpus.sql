-- The type corpus (tests/types_corpus.rs): every class of column type, in
-- non-public schemas with quoted and non-ASCII names, with NULLs and edge
-- values. Runs on the source before the migration starts, on any version
-- 11+: what a version lacks (generated columns before 12, multiranges before
-- 14) is left out there (psql's \if on the server's version).
SELECT current_setting('server_version_num')::int >= 120000 AS has_generated,
       current_setting('server_version_num')::int >= 140000 AS has_multirange,
       -- numeric infinities exist from 14
       CASE WHEN current_setting('server_version_num')::int >= 140000 THEN 'Infinity' ELSE '1e100' END AS num_inf,
       CASE WHEN current_setting('server_version_num')::int >= 140000 THEN '-Infinity' ELSE '-1e100' END AS num_ninf
\gset
CREATE EXTENSION hstore;
CREATE EXTENSION citext;
CREATE SCHEMA types_schema;
CREATE SCHEMA "Tÿpes ""Ω""";

-- User types.
CREATE TYPE types_schema.mood AS ENUM ('sad', 'happy');
-- Values added later: their OIDs are out of sort order.
ALTER TYPE types_schema.mood ADD VALUE 'ok' BEFORE 'happy';
ALTER TYPE types_schema.mood ADD VALUE 'elated' AFTER 'happy';
CREATE DOMAIN types_schema.posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN types_schema.small AS types_schema.posint CHECK (VALUE < 1000);
CREATE DOMAIN types_schema.ints AS integer[] CHECK (cardinality(VALUE) < 100);
CREATE DOMAIN "Tÿpes ""Ω"""."Émail" AS citext CHECK (VALUE ~ '@');
CREATE DOMAIN types_schema.mood_d AS types_schema.mood;
CREATE DOMAIN types_schema.doc AS jsonb CHECK (jsonb_typeof(VALUE) = 'object');
CREATE TYPE types_schema.complex AS (r float8, i float8);
CREATE TYPE "Tÿpes ""Ω"""."Äddr" AS (street text, zip types_schema.posint, tags text[], at types_schema.complex);
CREATE TYPE types_schema.floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
CREATE TYPE types_schema.timerange AS RANGE (subtype = time);

-- Every built-in scalar type; copied in binary.
CREATE TABLE types_schema.builtins (
    id int PRIMARY KEY,
    c_bool boolean, c_int2 smallint, c_int4 integer, c_int8 bigint,
    c_num numeric, c_num_p numeric(12,4), c_float4 real, c_float8 double precision,
    c_money money, c_char char(5), c_varchar varchar(10), c_text text, c_name name, c_char1 "char",
    c_bytea bytea, c_bit bit(4), c_varbit varbit, c_uuid uuid,
    c_inet inet, c_cidr cidr, c_mac macaddr, c_mac8 macaddr8,
    c_interval interval, c_time time, c_timetz timetz, c_ts timestamp, c_tstz timestamptz, c_date date,
    c_json json, c_jsonb jsonb, c_xml xml, c_tsv tsvector, c_tsq tsquery,
    c_point point, c_line line, c_lseg lseg, c_box box, c_path path, c_polygon polygon, c_circle circle,
    c_lsn pg_lsn, c_oid oid, c_regclass regclass, c_regtype regtype, c_regproc regproc, c_xid xid,
    c_big text
);
INSERT INTO types_schema.builtins VALUES
 (1, true, 32767, 2147483647, 9223372036854775807,
  'NaN', 12345678.1234, 'NaN', 'NaN',
  '92233720368547758.07', 'ab', 'ten chars!', E'tab\there\nline ''q'' "dq" \\ é 😀', 'a name', 'x',
  '\x00ff10', B'1010', B'10101', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '2001:db8::1/64', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
  '1 year 2 mons 3 days 04:05:06.789', '24:00:00', '23:59:59.999999+14', 'infinity', 'infinity', 'infinity',
  '{"a": [1, 2.50, null], "b": "\u00e9"}', '{"k": {"n": 1e3}, "e": []}', '<a b="1">x &amp; y</a>', 'a:1A fat:2B cats', 'fat & (rat | !cat)',
  '(1.5,-2)', '{1,-1,0}', '[(0,0),(1,1)]', '(2,2),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),5>',
  'FFFFFFFF/FFFFFFFF', 4294967295, 'pg_class', 'integer', 'now', '42',
  (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)),
 (2, false, -32768, -2147483648, -9223372036854775808,
  :'num_inf', -0.0001, 'Infinity', '-Infinity',
  '-92233720368547758.08', '', '', '', '', ' ',
  '\x', B'0000', B'', '00000000-0000-0000-0000-000000000000',
  '0.0.0.0', '::/0', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00',
  '-178000000 years', '00:00:00', '00:00:00-15:59', '-infinity', '-infinity', '-infinity',
  'null', '[]', '<empty/>', '', 'a',
  '(0,0)', '{0,1,0}', '[(0,0),(0,0)]', '(0,0),(0,0)', '((0,0))', '((0,0))', '<(0,0),0>',
  '0/0', 0, '-', '-', '-', '0',
  (SELECT string_agg(md5((-g)::text), '') FROM generate_series(1, 400) g)),
 (3, NULL, 0, 0, 0,
  :'num_ninf', 0, '-0', '1e-308',
  0, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL,
  '-1 days -00:00:00.000001', '12:34:56.789', NULL, '4713-01-01 00:00:00 BC', '294276-12-31 23:59:59.999999+00', '5874897-12-31',
  NULL, 'null', NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL,
  NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

-- The same built-ins copied as text (a composite column's binary form
-- carries OIDs, so the table is copied as text), under REPLICA IDENTITY FULL.
CREATE TABLE types_schema.builtins_text (LIKE types_schema.builtins INCLUDING ALL, mood types_schema.mood,
    cx types_schema.complex);
INSERT INTO types_schema.builtins_text SELECT b.*, 'ok', '(1,NaN)' FROM types_schema.builtins b;
ALTER TABLE types_schema.builtins_text REPLICA IDENTITY FULL;

-- Arrays: multi-dimensional, NULL elements, lower bounds, of user types.
CREATE TABLE types_schema.arrays (
    id int PRIMARY KEY,
    a_int int[], a_int2d int[][], a_text text[], a_num numeric[], a_tstz timestamptz[], a_uuid uuid[],
    a_jsonb jsonb[], a_json json[], a_bytea bytea[], a_inet inet[], a_point point[], a_bool bool[],
    a_varchar varchar(5)[], a_interval interval[],
    a_mood types_schema.mood[], a_complex types_schema.complex[], a_posint types_schema.posint[],
    a_range int4range[], a_hstore hstore[]
);
INSERT INTO types_schema.arrays VALUES
 (1, '{1,NULL,3}', '{{1,2},{3,NULL}}', '{"a b",NULL,"c,d","\"q\"","NULL",""}', ARRAY[1.5, 'NaN', :'num_ninf']::numeric[],
  '{infinity,"2020-01-01 00:00:00+00"}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
  ARRAY['{"a":1}'::jsonb, NULL], ARRAY['{"a": 1}'::json], '{"\\x00ff",NULL}', '{10.0.0.1,::1}', '{"(1,2)",NULL}', '{t,f,NULL}',
  '{ab,NULL}', '{"1 day",NULL}',
  '{sad,elated,NULL}', ARRAY[ROW(1,2)::types_schema.complex, NULL], '{1,2,NULL}',
  ARRAY['[1,5)'::int4range, 'empty'], ARRAY['a=>1, b=>NULL'::hstore]),
 (2, '[0:2]={7,8,9}', '{{{1},{2}},{{3},{4}}}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

-- Domains, enums, composites (nested), ranges and multiranges, extension types.
CREATE TABLE "Tÿpes ""Ω"""."Ünïcode Tåble" (
    "Ïd" bigint PRIMARY KEY,
    d_posint types_schema.posint, d_small types_schema.small, d_ints types_schema.ints,
    "Çmail" "Tÿpes ""Ω"""."Émail", d_mood types_schema.mood_d, d_doc types_schema.doc,
    e_mood types_schema.mood, c_complex types_schema.complex, c_addr "Tÿpes ""Ω"""."Äddr",
    c_addrs "Tÿpes ""Ω"""."Äddr"[],
    r_int4 int4range, r_int8 int8range, r_num numrange, r_ts tsrange, r_tstz tstzrange, r_date daterange,
    r_float types_schema.floatrange, r_time types_schema.timerange,
    x_hstore hstore, x_citext citext
);
INSERT INTO "Tÿpes ""Ω"""."Ünïcode Tåble" VALUES
 (1, 1, 999, '{1,2}', 'A@B.example', 'elated', '{"k": "v"}',
  'ok', '(1.5,-2.5)', '("Main St, 1",12345,"{a,NULL}","(0,NaN)")',
  ARRAY['("x",1,{},"(1,1)")'::"Tÿpes ""Ω"""."Äddr", NULL],
  '[1,10)', '(,)', numrange(:'num_ninf', 'NaN', '[]'), '[infinity,infinity]', '[-infinity,"2020-01-01 00:00:00+00")', '[2020-01-01,infinity)',
  '[1.5,2.5]', '[00:00,24:00]',
  '"k"=>"v", "n"=>NULL, "q\"uote"=>"é"', 'MiXeD Case'),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '(,,,)', NULL, 'empty', 'empty', 'empty', 'empty', 'empty', 'empty',
  'empty', 'empty', '', ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL);
\if :has_multirange
ALTER TABLE "Tÿpes ""Ω"""."Ünïcode Tåble" ADD COLUMN m_int4 int4multirange,
    ADD COLUMN m_date datemultirange, ADD COLUMN m_float types_schema.floatmultirange;
UPDATE "Tÿpes ""Ω"""."Ünïcode Tåble" SET m_int4 = '{[1,3),[5,7)}', m_date = '{}', m_float = '{[1,2],(3,4)}'
    WHERE "Ïd" = 1;
UPDATE "Tÿpes ""Ω"""."Ünïcode Tåble" SET m_int4 = '{}', m_date = '{}', m_float = '{}' WHERE "Ïd" = 2;
\endif

-- Generated stored and identity columns; a dropped column (attnum gap).
\if :has_generated
CREATE TABLE types_schema.computed (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    other bigint GENERATED BY DEFAULT AS IDENTITY,
    gone text,
    price numeric, qty int,
    total numeric GENERATED ALWAYS AS (price * qty) STORED,
    note text
);
\else
CREATE TABLE types_schema.computed (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    other bigint GENERATED BY DEFAULT AS IDENTITY,
    gone text,
    price numeric, qty int,
    total numeric,
    note text
);
\endif
INSERT INTO types_schema.computed (gone, price, qty, note) SELECT 'x', g, g, 'n' || g FROM generate_series(1, 5) g;
ALTER TABLE types_schema.computed DROP COLUMN gone;
INSERT INTO types_schema.computed (price, qty, note) VALUES (NULL, 1, NULL);

-- Replica identity USING INDEX.
CREATE TABLE types_schema.by_index (id int, code text NOT NULL, v jsonb, b bytea);
CREATE UNIQUE INDEX by_index_code ON types_schema.by_index (code);
ALTER TABLE types_schema.by_index REPLICA IDENTITY USING INDEX by_index_code;
INSERT INTO types_schema.by_index SELECT g, 'c' || g, jsonb_build_object('g', g), '\x01' FROM generate_series(1, 10) g;

-- Partitions (rows move between them), inheritance.
CREATE TABLE types_schema.events (id int, k int, payload text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE types_schema.events_low PARTITION OF types_schema.events FOR VALUES FROM (0) TO (100);
CREATE TABLE types_schema.events_high PARTITION OF types_schema.events FOR VALUES FROM (100) TO (200);
CREATE TABLE types_schema.events_other PARTITION OF types_schema.events DEFAULT;
INSERT INTO types_schema.events SELECT g, g * 10, 'e' || g FROM generate_series(1, 25) g;
CREATE TABLE types_schema.animals (id int PRIMARY KEY, name text);
CREATE TABLE types_schema.dogs (bark text) INHERITS (types_schema.animals);
ALTER TABLE types_schema.dogs ADD PRIMARY KEY (id);
INSERT INTO types_schema.animals VALUES (1, 'cat');
INSERT INTO types_schema.dogs VALUES (2, 'rex', 'woof');

-- Its column order is changed on the target by hand during the test.
CREATE TABLE types_schema.reordered (id int PRIMARY KEY, a text, b int, c date);
INSERT INTO types_schema.reordered SELECT g, 'a' || g, g, '2020-01-01'::date + g FROM generate_series(1, 5) g;

-- Materialized views end up populated on the target.
CREATE MATERIALIZED VIEW types_schema.mood_counts AS
    SELECT e_mood, count(*) AS n FROM "Tÿpes ""Ω"""."Ünïcode Tåble" GROUP BY e_mood;

-- Written by the kill -9 phase.
CREATE TABLE types_schema.ticks (id int PRIMARY KEY, at timestamptz DEFAULT '2000-01-01');

-- Floats whose shortest exact form has more than 15 digits: they must
-- arrive bit for bit (11 prints 15 digits unless told otherwise), copied in
-- binary and (with a composite column) as text.
CREATE TABLE types_schema.floats (id int PRIMARY KEY, f8 float8, f4 real, f8s float8[], cx types_schema.complex);
INSERT INTO types_schema.floats VALUES
 (1, 0.1::float8 + 0.2, 0.1::real * 3, ARRAY[0.1::float8 + 0.2, 1.0 / 3], ROW(pi(), 2.0 / 3)),
 (2, 4.9e-324, 1.4e-45, ARRAY[1.7976931348623157e308], ROW(-0.0, 1e-310)),
 (3, 123456789.12345679, 16777217, NULL, NULL);
