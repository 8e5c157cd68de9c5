-- Capture: statement-level triggers (with transition tables) that journal every INSERT, UPDATE,
-- DELETE and TRUNCATE of a table as `journaled_audit_log_event` records in journaled.jobs, in
-- the writer's transaction. One trigger call per statement, whatever the number of rows.
--
-- The per-table triggers are not created here: `journaled capture enable TABLE` (or
-- `Journaled::enable_capture`, or `SELECT journaled.enable_capture('table', '{…}')` in an
-- application's own migration) creates them, idempotently.

-- A bulk statement's job rows are large (a 100,000-row UPDATE writes about 40 MB of records):
-- lz4 compresses them several times faster than the default pglz, where the server has it
-- (PostgreSQL 14 or later, built with lz4). Rows already written keep their compression, and
-- rows under 2 kB are not compressed at all.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 140000
       AND EXISTS (SELECT 1 FROM pg_settings
                   WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        EXECUTE 'ALTER TABLE journaled.jobs ALTER COLUMN records SET COMPRESSION lz4';
    END IF;
END
$$;

-- What is captured, and how. `options` holds the lists the triggers apply (see
-- journaled.capture_sql): ignore, default_ignore, sensitive, only, filter_parameters, snapshot,
-- snapshot_on_deletion, app_name, max_record_size.
CREATE TABLE journaled.captures (
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    relid        oid         NOT NULL, -- follows renames; the name finds it again after a restore
    class_name   text        NOT NULL,
    stream       text        NOT NULL,
    priority     integer     NOT NULL,
    options      jsonb       NOT NULL DEFAULT '{}',
    enabled_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);
CREATE INDEX captures_relid_idx ON journaled.captures (relid);

-- Whether a column's values are filtered: it contains a sensitive name (case-insensitive, as
-- Rails' filter_parameters), ends in _crypt or _hmac, or is marked sensitive. The same rule as
-- journaled::audit::is_sensitive.
CREATE FUNCTION journaled.capture_sensitive(name text, filter_parameters text[], marked text[])
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT lower(name) LIKE '%\_crypt' OR lower(name) LIKE '%\_hmac'
        OR EXISTS (SELECT 1 FROM unnest(marked) m WHERE lower(m) = lower(name))
        OR EXISTS (SELECT 1 FROM unnest(filter_parameters) f
                   WHERE f <> '' AND strpos(lower(name), lower(f)) > 0)
$$;

-- A JSON value with every sensitive key of nested objects filtered (a null stays null).
CREATE FUNCTION journaled.capture_filter_json(v jsonb, filter_parameters text[])
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE jsonb_typeof(v)
        WHEN 'object' THEN coalesce(
            (SELECT jsonb_object_agg(key, CASE
                        WHEN NOT journaled.capture_sensitive(key, filter_parameters, '{}')
                            THEN journaled.capture_filter_json(value, filter_parameters)
                        WHEN value = 'null'::jsonb THEN value
                        ELSE '"[FILTERED]"'::jsonb END)
             FROM jsonb_each(v)), '{}'::jsonb)
        WHEN 'array' THEN coalesce(
            (SELECT jsonb_agg(journaled.capture_filter_json(e, filter_parameters) ORDER BY i)
             FROM jsonb_array_elements(v) WITH ORDINALITY AS a(e, i)), '[]'::jsonb)
        ELSE v END
$$;

-- The primary key's columns, in key order; NULL when the table has none.
CREATE FUNCTION journaled.capture_primary_key(rel oid) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(a.attname::text ORDER BY k.ord)
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary
$$;

-- An SQL expression joining `parts` (SQL expressions of text) with `sep`, skipping NULLs:
-- concat_ws, nested so that no call passes PostgreSQL's 100-argument limit.
CREATE FUNCTION journaled.capture_join(parts text[], sep text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_groups text[] := '{}';
    v_n int := coalesce(array_length(parts, 1), 0);
BEGIN
    IF v_n = 0 THEN
        RETURN '''''';
    ELSIF v_n <= 90 THEN
        RETURN format('concat_ws(%L, %s)', sep, array_to_string(parts, ', '));
    END IF;
    FOR i IN 0 .. (v_n - 1) / 90 LOOP
        v_groups := v_groups || format('nullif(%s, '''')',
            journaled.capture_join(parts[i * 90 + 1 : i * 90 + 90], sep));
    END LOOP;
    RETURN journaled.capture_join(v_groups, sep);
END
$$;

-- Raised when a captured change makes a record over the record limit (as journal! refuses it).
CREATE FUNCTION journaled.capture_too_large(tbl text, record_id text, size bigint, max_size int)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'JC006',
        MESSAGE = format('journaled capture: the audit event of %s record %s is %s bytes with its partition key, over the %s-byte record limit',
                         tbl, record_id, size, max_size);
END
$$;

-- The statement that journals one trigger call's rows, for the table's columns as they are now.
-- `p` holds the SQL expressions of its 12 inputs (journaled.capture_params, in order): $1..$12
-- for EXECUTE … USING, or `_j.head`, … in a generated trigger function:
-- 1 text after created_at (tags, class_name, table_name, up to record_id), 2 text after the
-- snapshot (actor, closing brace), 3 text now, 4 the stream as JSON, 5 priority, 6 record limit,
-- 7 id prefix, 8 id counter base, 9 bytes of a record that do not vary, 10 filter parameters,
-- 11 table name, 12 bytes per job step. `small`: the statement changed one row, so its one or
-- two events (a changed key) need no numbering or grouping: each is a job of its own.
CREATE FUNCTION journaled.capture_sql(rel oid, options jsonb, op text, p text[], small boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ignore text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(options->'ignore', '[]')))
        || ARRAY(SELECT jsonb_array_elements_text(coalesce(options->'default_ignore', '[]')));
    v_marked text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(options->'sensitive', '[]')));
    v_only text[] := CASE WHEN jsonb_typeof(options->'only') = 'array'
        THEN ARRAY(SELECT jsonb_array_elements_text(options->'only')) END;
    v_filter text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(options->'filter_parameters', '[]')));
    v_snapshot boolean := coalesce((options->>'snapshot')::boolean, false);
    v_snapshot_delete boolean := v_snapshot OR coalesce((options->>'snapshot_on_deletion')::boolean, false);
    v_pk text[] := journaled.capture_primary_key(rel);
    v_col record;
    v_pk_type text;
    v_val_o text;
    v_val_n text;
    v_cmp text;
    v_insert text[] := '{}';
    v_update text[] := '{}';
    v_snap_o text[] := '{}';
    v_snap_n text[] := '{}';
    v_created text := p[3];
    v_updated text := p[3];
    v_rid_o text;
    v_rid_n text;
    v_d text;
    v_keep text := 'true';
    v_source text;
    v_record text;
    v_size text;
    v_check text;
BEGIN
    IF v_pk IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'JC003',
            MESSAGE = format('journaled capture: table %s has no primary key, so its changes have no record id', rel::regclass);
    END IF;
    FOR v_col IN
        SELECT a.attname::text AS name, t.typname::text AS typname, t.typtype, t.typcategory,
               et.typtype AS elem_typtype, et.typname::text AS elem_typname,
               EXISTS (SELECT 1 FROM pg_operator p
                       WHERE p.oprname = '=' AND p.oprleft = a.atttypid AND p.oprright = a.atttypid) AS has_eq
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attname COLLATE "C"  -- the byte order serde_json's maps have
    LOOP
        IF v_col.name = v_pk[1] THEN
            v_pk_type := v_col.typname;
        END IF;
        IF journaled.capture_sensitive(v_col.name, v_filter, v_marked) THEN
            v_val_o := format('CASE WHEN o.%I IS NULL THEN ''null'' ELSE ''"[FILTERED]"'' END', v_col.name);
            v_val_n := format('CASE WHEN n.%I IS NULL THEN ''null'' ELSE ''"[FILTERED]"'' END', v_col.name);
        ELSIF v_col.typname IN ('json', 'jsonb') OR v_col.typtype = 'c'
              OR v_col.elem_typname IN ('json', 'jsonb') OR v_col.elem_typtype = 'c' THEN
            -- Values that can hold objects: sensitive keys inside them are filtered too.
            v_val_o := format('coalesce(journaled.capture_filter_json(to_jsonb(o.%I), %s)::text, ''null'')', v_col.name, p[10]);
            v_val_n := format('coalesce(journaled.capture_filter_json(to_jsonb(n.%I), %s)::text, ''null'')', v_col.name, p[10]);
        ELSIF v_col.typname IN ('int2', 'int4', 'int8', 'bool', 'oid') THEN
            v_val_o := format('coalesce(o.%I::text, ''null'')', v_col.name);
            v_val_n := format('coalesce(n.%I::text, ''null'')', v_col.name);
        ELSE
            v_val_o := format('coalesce(to_json(o.%I)::text, ''null'')', v_col.name);
            v_val_n := format('coalesce(to_json(n.%I)::text, ''null'')', v_col.name);
        END IF;
        v_snap_o := v_snap_o || format('%s || %s', quote_literal(to_json(v_col.name)::text || ':'), v_val_o);
        v_snap_n := v_snap_n || format('%s || %s', quote_literal(to_json(v_col.name)::text || ':'), v_val_n);
        IF NOT v_col.name = ANY (v_ignore) AND (v_only IS NULL OR v_col.name = ANY (v_only)) THEN
            v_cmp := CASE WHEN v_col.has_eq
                THEN format('o.%1$I IS DISTINCT FROM n.%1$I', v_col.name)
                ELSE format('o.%1$I::text IS DISTINCT FROM n.%1$I::text', v_col.name) END;
            v_update := v_update || format('CASE WHEN %s THEN %s || %s || '','' || %s || '']'' END',
                                           v_cmp, quote_literal(to_json(v_col.name)::text || ':['), v_val_o, v_val_n);
            v_insert := v_insert || format('CASE WHEN n.%I IS NOT NULL THEN %s || %s || '']'' END',
                                           v_col.name, quote_literal(to_json(v_col.name)::text || ':[null,'), v_val_n);
        END IF;
        -- created_at: the record's created_at on insert, its updated_at on update, else now.
        IF v_col.typname IN ('timestamptz', 'timestamp') AND v_col.name IN ('created_at', 'updated_at') THEN
            v_cmp := format(CASE WHEN v_col.typname = 'timestamptz'
                    THEN 'coalesce(to_char(n.%I AT TIME ZONE ''UTC'', ''YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"''), %s)'
                    ELSE 'coalesce(to_char(n.%I, ''YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"''), %s)' END, v_col.name, p[3]);
            IF v_col.name = 'created_at' THEN v_created := v_cmp; ELSE v_updated := v_cmp; END IF;
        END IF;
    END LOOP;

    IF array_length(v_pk, 1) = 1 AND v_pk_type IN ('int2', 'int4', 'int8', 'uuid') THEN
        -- Nothing to escape.
        v_rid_o := format('''"'' || o.%I || ''"''', v_pk[1]);
        v_rid_n := format('''"'' || n.%I || ''"''', v_pk[1]);
    ELSIF array_length(v_pk, 1) = 1 THEN
        v_rid_o := format('to_json(o.%I::text)::text', v_pk[1]);
        v_rid_n := format('to_json(n.%I::text)::text', v_pk[1]);
    ELSE
        -- A composite key: its values as a JSON array, e.g. "[7,\"b\"]".
        v_rid_o := format('to_json(concat(''['', %s, '']''))::text', journaled.capture_join(
            ARRAY(SELECT format('coalesce(to_json(o.%I)::text, ''null'')', c) FROM unnest(v_pk) c), ','));
        v_rid_n := format('to_json(concat(''['', %s, '']''))::text', journaled.capture_join(
            ARRAY(SELECT format('coalesce(to_json(n.%I)::text, ''null'')', c) FROM unnest(v_pk) c), ','));
    END IF;

    IF op = 'INSERT' THEN
        v_d := format('SELECT ''insert'' AS op, %s AS record_id, %s AS changes, %s AS snapshot, %s AS created_at FROM journaled_new n',
            v_rid_n, journaled.capture_join(v_insert, ','),
            CASE WHEN v_snapshot THEN format('concat(''{'', %s, ''}'')', journaled.capture_join(v_snap_n, ',')) ELSE '''null''' END,
            v_created);
    ELSIF op = 'UPDATE' THEN
        -- Rows are paired by primary key. A row whose key changed has no pair: it is journaled
        -- as the deletion of the old key and the insertion of the new one.
        v_d := format(
            'SELECT CASE WHEN o.%1$I IS NULL THEN ''insert'' WHEN n.%1$I IS NULL THEN ''delete'' ELSE ''update'' END AS op, '
            'CASE WHEN n.%1$I IS NULL THEN %2$s ELSE %3$s END AS record_id, '
            'CASE WHEN o.%1$I IS NULL THEN %4$s WHEN n.%1$I IS NULL THEN '''' ELSE %5$s END AS changes, '
            'CASE WHEN o.%1$I IS NULL THEN %6$s WHEN n.%1$I IS NULL THEN %7$s ELSE %6$s END AS snapshot, '
            'CASE WHEN o.%1$I IS NULL THEN %8$s WHEN n.%1$I IS NULL THEN %11$s ELSE %9$s END AS created_at '
            'FROM journaled_old o FULL JOIN journaled_new n ON %10$s OFFSET 0',
            v_pk[1], v_rid_o, v_rid_n,
            journaled.capture_join(v_insert, ','), journaled.capture_join(v_update, ','),
            CASE WHEN v_snapshot THEN format('concat(''{'', %s, ''}'')', journaled.capture_join(v_snap_n, ',')) ELSE '''null''' END,
            CASE WHEN v_snapshot_delete THEN format('concat(''{'', %s, ''}'')', journaled.capture_join(v_snap_o, ',')) ELSE '''null''' END,
            v_created, v_updated,
            (SELECT string_agg(format('o.%1$I = n.%1$I', c), ' AND ') FROM unnest(v_pk) c),
            p[3]);
        v_keep := 'op <> ''update'' OR changes <> ''''';
    ELSE
        -- DELETE reads the old rows; TRUNCATE (a BEFORE trigger) reads the table itself.
        v_source := CASE WHEN op = 'DELETE' THEN 'journaled_old o'
            -- Schema-qualified: the statement may run under another search_path.
            ELSE (SELECT format('%s %I.%I o', CASE WHEN c.relkind = 'p' THEN '' ELSE 'ONLY' END, n.nspname, c.relname)
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel) END;
        v_d := format('SELECT ''delete'' AS op, %s AS record_id, '''' AS changes, %s AS snapshot, %s AS created_at FROM %s',
            v_rid_o,
            CASE WHEN v_snapshot_delete THEN format('concat(''{'', %s, ''}'')', journaled.capture_join(v_snap_o, ',')) ELSE '''null''' END,
            p[3], v_source);
    END IF;

    -- `||` rather than concat(): every piece is non-null, and it copies less.
    v_record := format($rec$'{"id":"' || id || '","stream":' || %s || ',"partition_key":"' || id || '","data":{"id":"' || id
        || '","event_type":"journaled_audit_log_event","created_at":"' || created_at || %s || record_id
        || ',"database_operation":"' || op || '","changes":{' || changes || '},"snapshot":' || snapshot || %s || '}'$rec$,
        p[4], p[1], p[2]);
    v_size := format('%s + octet_length(op) + octet_length(record_id) + octet_length(changes) '
                     '+ octet_length(snapshot) + octet_length(created_at)', p[9]);
    v_check := format($chk$CASE WHEN size <= %1$s THEN true
        ELSE journaled.capture_too_large(%2$s, record_id::json #>> '{}', size, %1$s) END$chk$, p[6], p[11]);
    IF small THEN
        RETURN format($sql$
WITH d AS (%1$s)
INSERT INTO journaled.jobs (priority, run_at, ready, event_count, bytes, records)
SELECT %3$s, now(), true, 1, octet_length(records), records FROM (
    SELECT '[' || %4$s || ']' AS records
    FROM (
        SELECT %5$s || lpad(to_hex(%6$s + CASE op WHEN 'update' THEN 1 WHEN 'insert' THEN 2 ELSE 3 END), 12, '0') AS id, e.*
        FROM (SELECT d.*, %7$s AS size FROM d WHERE %2$s) AS e
        WHERE %8$s
    ) AS x
) AS one$sql$,
            v_d, v_keep, p[5], v_record, p[7], p[8], v_size, v_check);
    END IF;
    -- Events numbered and measured in order; cut into jobs of at most 500 records, and of at
    -- most p[12] bytes plus one record (so at most 5 MiB), as the library's own jobs are.
    RETURN format($sql$
WITH d AS (%1$s)
INSERT INTO journaled.jobs (priority, run_at, ready, event_count, bytes, records)
SELECT %3$s, now(), true, n, octet_length(records), records FROM (
    SELECT (rn - 1) / 500 AS by_count, before / %4$s AS by_bytes, count(*)::int AS n,
           '[' || string_agg(%5$s, ',') || ']' AS records
    FROM (
        SELECT %6$s || lpad(to_hex(%7$s + rn), 12, '0') AS id, f.*
        FROM (
            SELECT e.*, row_number() OVER w AS rn, sum(size) OVER w - size AS before
            FROM (SELECT d.*, %8$s AS size FROM d WHERE %2$s) AS e
            WINDOW w AS (ROWS UNBOUNDED PRECEDING)
        ) AS f
        WHERE %9$s
    ) AS x
    GROUP BY 1, 2
) AS chunks
ORDER BY by_count, by_bytes$sql$,
        v_d, v_keep, p[5], p[12], v_record, p[7], p[8], v_size, v_check);
END
$$;

-- What a trigger call binds into its statement (see journaled.capture_sql), and what it checks.
CREATE TYPE journaled.capture_params AS (
    head        text,    -- after created_at: tags, class_name, table_name, up to record_id
    tail        text,    -- after the snapshot: actor and the closing brace
    now         text,    -- the statement's time, formatted as created_at
    stream      text,    -- as JSON
    priority    integer,
    max_size    integer, -- the record limit, data plus partition key
    id_prefix   text,    -- UUID v7: the millisecond, random bits …
    id_base     bigint,  -- … and where the per-row counter starts
    fixed_bytes integer, -- bytes of every record that do not vary
    filter      text[],  -- sensitive names
    table_name  text,
    step        integer, -- a job holds records whose running total stays within one step
    options     jsonb,
    signature   text     -- the table's columns and key (journaled.capture_signature)
);

-- What a generated trigger function was generated for, besides the table's name (which it
-- compares with TG_TABLE_SCHEMA and TG_TABLE_NAME): the table's columns (names and types) and
-- primary key. When they differ (ALTER TABLE), the function builds its statement anew.
-- (plpgsql, not sql: its plan is then kept for the session, not made again on every call.)
CREATE FUNCTION journaled.capture_signature(rel oid) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT string_agg(a.attname || ' ' || a.atttypid, ',' ORDER BY a.attnum)
            FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped)
           || ';' || coalesce((SELECT i.indkey::text FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary), '');
END
$$;

-- Raised when the setting journaled.tags is JSON but not an object.
CREATE FUNCTION journaled.capture_bad_tags(tags text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'JC007',
        MESSAGE = format('journaled capture: the setting journaled.tags is not a JSON object: %s', left(tags, 200));
END
$$;

-- Everything one trigger call needs besides its rows, from a capture's settings: who acts (the
-- transaction-local settings journaled.actor and journaled.tags, which a journaled transaction
-- sets with Config::with_capture_context; for other writers, such as psql or another service,
-- gid://<app>/db/<current_user> and application_name in the tags), the time, ids. One
-- statement, planned once per session: it runs for every captured statement.
CREATE FUNCTION journaled.capture_params_for(class_name text, stream text, priority integer, max_size integer,
                                             filter text[], app_name text, tbl_schema name, tbl_name name)
RETURNS journaled.capture_params LANGUAGE plpgsql AS $$
DECLARE
    v_p journaled.capture_params;
BEGIN
    SELECT h.head,
           h.tail,
           to_char(t.now AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"'),
           to_json(stream)::text,
           priority,
           m.max_size,
           -- Ids: UUID v7 from the statement's millisecond and random bits, then a per-row counter.
           concat(substr(t.ms, 1, 8), '-', substr(t.ms, 9, 4), '-7', substr(t.hex, 14, 3), '-',
                  to_hex((('x' || substr(t.hex, 17, 2))::bit(8)::int & 63) | 128), substr(t.hex, 19, 2), '-'),
           ('x' || substr(t.hex, 21, 12))::bit(48)::bigint & 140737488355327,
           -- Data (with its id) plus partition key, less what varies per row.
           octet_length(concat('{"id":"', repeat('0', 36), '","event_type":"journaled_audit_log_event","created_at":"',
                               h.head, ',"database_operation":"', '","changes":{', '},"snapshot":', h.tail)) + 36,
           filter,
           m.tbl,
           greatest(5242880 - m.max_size, 1048576)
    INTO v_p
    FROM (SELECT s.now, encode(uuid_send(gen_random_uuid()), 'hex') AS hex,
                 lpad(to_hex((extract(epoch FROM s.now) * 1000)::bigint), 12, '0') AS ms
          FROM (SELECT clock_timestamp() AS now) AS s) AS t,
         (SELECT coalesce(max_size, 1048576) AS max_size,
                 CASE WHEN tbl_schema = 'public' THEN tbl_name::text ELSE tbl_schema || '.' || tbl_name END AS tbl,
                 nullif(current_setting('journaled.actor', true), '') AS actor,
                 coalesce(nullif(current_setting('journaled.tags', true), ''), '{}') AS tags) AS m,
         LATERAL (SELECT concat('","tags":',
                                CASE WHEN m.actor IS NULL
                                     THEN concat('{"application_name":', to_json(current_setting('application_name'))::text, '}')
                                     WHEN json_typeof(m.tags::json) = 'object' THEN m.tags
                                     ELSE journaled.capture_bad_tags(m.tags) END,
                                ',"class_name":', to_json(class_name)::text,
                                ',"table_name":', to_json(m.tbl)::text, ',"record_id":') AS head,
                         concat(',"actor":', to_json(coalesce(m.actor, format('gid://%s/db/%s',
                                coalesce(app_name, current_database()), current_user)))::text, '}') AS tail) AS h;
    RETURN v_p;
END
$$;

-- The same from the table's registration in journaled.captures, with the table's signature:
-- what a trigger function needs when it builds its statement from the catalog.
CREATE FUNCTION journaled.capture_prepare(rel oid, tbl_schema name, tbl_name name)
RETURNS journaled.capture_params LANGUAGE plpgsql AS $$
DECLARE
    v_cap journaled.captures;
    v_p journaled.capture_params;
BEGIN
    SELECT * INTO v_cap FROM journaled.captures WHERE relid = rel LIMIT 1;
    IF NOT FOUND THEN
        SELECT * INTO v_cap FROM journaled.captures WHERE table_schema = tbl_schema AND table_name = tbl_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'JC008',
                MESSAGE = format('journaled capture: %s has capture triggers but is not in journaled.captures',
                                 CASE WHEN tbl_schema = 'public' THEN tbl_name::text ELSE tbl_schema || '.' || tbl_name END),
                HINT = 'run `journaled capture enable` on it again, or `journaled capture disable`';
        END IF;
    END IF;
    v_p := journaled.capture_params_for(v_cap.class_name, v_cap.stream, v_cap.priority,
                                        (v_cap.options->>'max_record_size')::int,
                                        ARRAY(SELECT jsonb_array_elements_text(coalesce(v_cap.options->'filter_parameters', '[]'))),
                                        v_cap.options->>'app_name', tbl_schema, tbl_name);
    v_p.options := v_cap.options;
    v_p.signature := journaled.capture_signature(rel);
    RETURN v_p;
END
$$;

-- The CREATE FUNCTION statement of a table's trigger function: its statements and settings are
-- generated for the table's columns and the capture's settings, as static SQL, so each session
-- plans them once (a statement of one row costs about what a row-level trigger does). If the
-- table's name, columns or key have changed since, it builds its statement anew on each call,
-- from the registration (correct, slower), until capture is enabled again. Change a capture
-- with journaled.enable_capture, not by editing journaled.captures.
CREATE FUNCTION journaled.capture_function_sql(rel oid, class_name text, stream text, priority integer,
                                               options jsonb) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_static text[] := ARRAY['_j.head', '_j.tail', '_j.now', '_j.stream', '_j.priority', '_j.max_size',
                             '_j.id_prefix', '_j.id_base', '_j.fixed_bytes', '_j.filter', '_j.table_name', '_j.step'];
    v_dynamic text[] := ARRAY['$1', '$2', '$3', '$4', '$5', '$6', '$7', '$8', '$9', '$10', '$11', '$12'];
    v_body text;
BEGIN
    v_body := format($body$
-- Generated by journaled.enable_capture for the options %7$L.
DECLARE
    _j journaled.capture_params;
    _rows int;  -- 0, 1, or 2 for more
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO _rows FROM (SELECT FROM journaled_new LIMIT 2) AS r;
    ELSIF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT count(*) INTO _rows FROM (SELECT FROM journaled_old LIMIT 2) AS r;
    END IF;
    IF _rows = 0 THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME <> %14$L OR TG_TABLE_SCHEMA <> %15$L
       OR journaled.capture_signature(TG_RELID) IS DISTINCT FROM %1$L THEN
        -- The table changed since this function was generated: build the statement for what
        -- it is now, from its registration.
        _j := journaled.capture_prepare(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME);
        EXECUTE journaled.capture_sql(TG_RELID, _j.options, TG_OP, %2$L)
        USING _j.head, _j.tail, _j.now, _j.stream, _j.priority, _j.max_size, _j.id_prefix, _j.id_base,
              _j.fixed_bytes, _j.filter, _j.table_name, _j.step;
        RETURN NULL;
    END IF;
    _j := journaled.capture_params_for(%11$L, %12$L, %13$s, %16$s, %17$L, %18$L, TG_TABLE_SCHEMA, TG_TABLE_NAME);
    IF TG_OP = 'INSERT' AND _rows = 1 THEN
        %8$s;
    ELSIF TG_OP = 'INSERT' THEN
        %3$s;
    ELSIF TG_OP = 'UPDATE' AND _rows = 1 THEN
        %9$s;
    ELSIF TG_OP = 'UPDATE' THEN
        %4$s;
    ELSIF TG_OP = 'DELETE' AND _rows = 1 THEN
        %10$s;
    ELSIF TG_OP = 'DELETE' THEN
        %5$s;
    ELSE
        %6$s;
    END IF;
    RETURN NULL;
END
$body$,
        journaled.capture_signature(rel), v_dynamic,
        journaled.capture_sql(rel, options, 'INSERT', v_static),
        journaled.capture_sql(rel, options, 'UPDATE', v_static),
        journaled.capture_sql(rel, options, 'DELETE', v_static),
        journaled.capture_sql(rel, options, 'TRUNCATE', v_static),
        options,
        journaled.capture_sql(rel, options, 'INSERT', v_static, true),
        journaled.capture_sql(rel, options, 'UPDATE', v_static, true),
        journaled.capture_sql(rel, options, 'DELETE', v_static, true),
        class_name, stream, priority,
        (SELECT relname FROM pg_class WHERE oid = rel),
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel),
        coalesce((options->>'max_record_size')::int, 1048576),
        ARRAY(SELECT jsonb_array_elements_text(coalesce(options->'filter_parameters', '[]'))),
        options->>'app_name');
    -- Transition tables have no statistics, so row estimates are blind: without these settings
    -- JIT compilation and disk sorts cost more than the work.
    RETURN format('CREATE OR REPLACE FUNCTION journaled.%I() RETURNS trigger LANGUAGE plpgsql '
                  'SET jit = off SET work_mem = ''64MB'' SET enable_sort = off AS %L',
                  'capture_' || rel, v_body);
END
$$;

-- Drops a table's capture triggers and the functions they called; returns whether it had any.
CREATE FUNCTION journaled.capture_drop_triggers(rel regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger record;
    v_functions regprocedure[] := '{}';
    v_function regprocedure;
BEGIN
    FOR v_trigger IN
        SELECT t.tgname, t.tgfoid FROM pg_trigger t
        WHERE t.tgrelid = rel AND t.tgname IN ('journaled_capture_insert', 'journaled_capture_update',
                                               'journaled_capture_delete', 'journaled_capture_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger.tgname, rel);
        IF NOT v_trigger.tgfoid = ANY (v_functions) THEN
            v_functions := v_functions || v_trigger.tgfoid::regprocedure;
        END IF;
    END LOOP;
    FOREACH v_function IN ARRAY v_functions LOOP
        IF EXISTS (SELECT 1 FROM pg_proc WHERE oid = v_function
                   AND pronamespace = 'journaled'::regnamespace AND proname ~ '^capture_[0-9]+$'
                   AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = v_function)) THEN
            EXECUTE format('DROP FUNCTION %s', v_function);
        END IF;
    END LOOP;
    RETURN cardinality(v_functions) > 0;
END
$$;

-- Installs capture on a table, idempotently: registers it (or updates its options) and
-- (re)creates its trigger function and triggers. `options` (all optional): class_name, stream, priority, ignore,
-- default_ignore, sensitive, only, filter_parameters, snapshot, snapshot_on_deletion, app_name,
-- max_record_size. Refuses a missing table, a view, a table without a primary key, unknown
-- columns and an invalid stream name, each with an error naming the table.
CREATE FUNCTION journaled.enable_capture(tbl text, options jsonb DEFAULT '{}')
RETURNS journaled.captures LANGUAGE plpgsql AS $$
DECLARE
    v_rel regclass := to_regclass(tbl);
    v_kind "char";
    v_schema text;
    v_name text;
    v_unknown text[];
    v_stream text := options->>'stream';
    v_row journaled.captures;
    v_function text;
BEGIN
    IF v_rel IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'JC001',
            MESSAGE = format('journaled capture: there is no table %s', tbl);
    END IF;
    SELECT c.relkind, n.nspname, c.relname INTO v_kind, v_schema, v_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel;
    IF v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION USING ERRCODE = 'JC002',
            MESSAGE = format('journaled capture: %s is not a table (only tables can be captured)', v_rel);
    END IF;
    IF journaled.capture_primary_key(v_rel) IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'JC003',
            MESSAGE = format('journaled capture: table %s has no primary key, so its changes have no record id', v_rel);
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO v_unknown
    FROM (SELECT jsonb_array_elements_text(coalesce(options->'ignore', '[]'))
          UNION ALL SELECT jsonb_array_elements_text(coalesce(options->'sensitive', '[]'))
          UNION ALL SELECT jsonb_array_elements_text(CASE WHEN jsonb_typeof(options->'only') = 'array'
                                                      THEN options->'only' ELSE '[]' END)) AS named(c)
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = named.c);
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'JC004',
            MESSAGE = format('journaled capture: table %s has no column %s', v_rel, array_to_string(v_unknown, ', ')),
            DETAIL = array_to_string(v_unknown, ',');
    END IF;
    IF v_stream IS NULL OR v_stream !~ '^[A-Za-z0-9_.-]{1,128}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'JC005',
            MESSAGE = format('journaled capture: table %s needs a valid stream name (1 to 128 of a-z, A-Z, 0-9, _ . -), got %s',
                             v_rel, coalesce(quote_literal(v_stream), 'none'));
    END IF;

    INSERT INTO journaled.captures AS c (table_schema, table_name, relid, class_name, stream, priority, options)
    VALUES (v_schema, v_name, v_rel,
            coalesce(nullif(options->>'class_name', ''), v_name),
            v_stream,
            coalesce((options->>'priority')::int, 20),
            options - 'class_name' - 'stream' - 'priority')
    ON CONFLICT (table_schema, table_name) DO UPDATE
        SET relid = EXCLUDED.relid, class_name = EXCLUDED.class_name, stream = EXCLUDED.stream,
            priority = EXCLUDED.priority, options = EXCLUDED.options, enabled_at = now()
    RETURNING * INTO v_row;

    PERFORM journaled.capture_drop_triggers(v_rel);
    EXECUTE journaled.capture_function_sql(v_rel, v_row.class_name, v_row.stream, v_row.priority, v_row.options);
    v_function := format('journaled.%I', 'capture_' || v_rel::oid);
    EXECUTE format('CREATE TRIGGER journaled_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS journaled_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', v_rel, v_function);
    EXECUTE format('CREATE TRIGGER journaled_capture_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS journaled_old '
                   'NEW TABLE AS journaled_new FOR EACH STATEMENT EXECUTE FUNCTION %s()', v_rel, v_function);
    EXECUTE format('CREATE TRIGGER journaled_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS journaled_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', v_rel, v_function);
    EXECUTE format('CREATE TRIGGER journaled_capture_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', v_rel, v_function);
    RETURN v_row;
END
$$;

-- Removes capture from a table: its triggers and its registration. Returns whether it was
-- captured. A table that no longer exists only loses its registration.
CREATE FUNCTION journaled.disable_capture(tbl text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_rel regclass := to_regclass(tbl);
    v_name text[] := parse_ident(tbl);
    v_found boolean := false;
BEGIN
    IF v_rel IS NOT NULL THEN
        v_found := journaled.capture_drop_triggers(v_rel);
        DELETE FROM journaled.captures WHERE relid = v_rel
            OR (table_schema, table_name) = (SELECT n.nspname::text, c.relname::text FROM pg_class c
                                             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel);
    ELSE
        DELETE FROM journaled.captures
        WHERE table_name = v_name[array_length(v_name, 1)]
          AND (array_length(v_name, 1) = 1 OR table_schema = v_name[1]);
    END IF;
    RETURN v_found OR FOUND;
END
$$;
