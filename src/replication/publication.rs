//! The migration's publication on the source: which tables pgoutput streams.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::client::ReplicationError;
use crate::db::quote_ident;

/// Creates publication `name` for all tables (`tables = None`) or for the
/// given tables. Each table is a schema-qualified name in SQL syntax, as
/// `format('%I.%I', nspname, relname)` writes it (`public.t`,
/// `"Odd Schema"."T"`).
///
/// Idempotent: an existing publication of the same shape is kept; one of
/// another shape is replaced (in one transaction). `FOR ALL TABLES` needs a
/// superuser.
///
/// Partitioned tables are published as their leaf partitions on every
/// source version: lists name leaves (as `pg::tables::list_tables` gives them;
/// before 13 a partitioned table cannot be in a publication at all), and
/// `publish_via_partition_root` (13+) is never set, so changes arrive for
/// the leaf tables the schema copy recreates on the target.
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: Option<&[String]>,
) -> Result<(), ReplicationError> {
    let wanted = match tables {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|t| parse_qualified_name(t))
                .collect::<Result<BTreeSet<_>, _>>()?,
        ),
    };
    let context = || format!("creating publication \"{name}\"");
    let version = crate::pg::Version::of(client)
        .await
        .map_err(|source| ReplicationError::Sql {
            context: context(),
            source,
        })?;
    match existing_shape(client, version, name).await? {
        Some(current) if current == wanted => return Ok(()),
        Some(_) => {
            let sql = format!(
                "BEGIN; DROP PUBLICATION {}; {}; COMMIT",
                quote_ident(name),
                create_sql(version, name, wanted.as_ref())
            );
            if let Err(source) = client.batch_execute(&sql).await {
                // Leave the session usable for the caller.
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(ReplicationError::Sql {
                    context: context(),
                    source,
                });
            }
        }
        None => client
            .batch_execute(&create_sql(version, name, wanted.as_ref()))
            .await
            .map_err(|source| ReplicationError::Sql {
                context: context(),
                source,
            })?,
    }
    Ok(())
}

/// Drops publication `name` if it exists. Returns whether it existed.
pub async fn drop_publication(client: &Client, name: &str) -> Result<bool, ReplicationError> {
    let existed = publication_exists(client, name).await?;
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(|source| ReplicationError::Sql {
            context: format!("dropping publication \"{name}\""),
            source,
        })?;
    Ok(existed)
}

pub(crate) async fn publication_exists(
    client: &Client,
    name: &str,
) -> Result<bool, ReplicationError> {
    let row = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(|source| ReplicationError::Sql {
            context: format!("looking up publication \"{name}\""),
            source,
        })?;
    Ok(row.is_some())
}

type TableSet = BTreeSet<(String, String)>;

/// None: no such publication. Some(None): all tables. Some(Some(set)): those
/// tables. A publication that leaves out actions, rows or columns, or names
/// changes after the partition root, is reported with an impossible table
/// set, so it is replaced.
async fn existing_shape(
    client: &Client,
    version: crate::pg::Version,
    name: &str,
) -> Result<Option<Option<TableSet>>, ReplicationError> {
    let sql_err = |source| ReplicationError::Sql {
        context: format!("reading publication \"{name}\""),
        source,
    };
    let Some(row) = client
        .query_opt(&crate::pg::publication::shape_sql(version), &[&name])
        .await
        .map_err(sql_err)?
    else {
        return Ok(None);
    };
    let oid: tokio_postgres::types::Oid = row.get(0);
    if !row.get::<_, bool>(2) {
        // No wanted shape has an empty-named table.
        return Ok(Some(Some(TableSet::from([(String::new(), String::new())]))));
    }
    if row.get::<_, bool>(1) {
        return Ok(Some(None));
    }
    let rows = client
        .query(crate::pg::publication::TABLES_SQL, &[&oid])
        .await
        .map_err(sql_err)?;
    Ok(Some(Some(
        rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
    )))
}

fn create_sql(version: crate::pg::Version, name: &str, tables: Option<&TableSet>) -> String {
    let name = quote_ident(name);
    let with = crate::pg::publication::create_options(version);
    match tables {
        None => format!("CREATE PUBLICATION {name} FOR ALL TABLES{with}"),
        // A publication without tables publishes nothing, which is what an
        // empty filter means.
        Some(t) if t.is_empty() => format!("CREATE PUBLICATION {name}{with}"),
        Some(t) => {
            let list: Vec<String> = t
                .iter()
                .map(|(s, r)| format!("{}.{}", quote_ident(s), quote_ident(r)))
                .collect();
            format!(
                "CREATE PUBLICATION {name} FOR TABLE {}{with}",
                list.join(", ")
            )
        }
    }
}

/// Splits `schema.table` in SQL syntax into its two names: quoted parts keep
/// their case (`""` is a quote), unquoted parts fold to lowercase.
pub(crate) fn parse_qualified_name(s: &str) -> Result<(String, String), ReplicationError> {
    let invalid = |why: &str| ReplicationError::Invalid {
        what: "table name".into(),
        message: format!(
            "`{s}`: {why}; expected schema.table, e.g. public.t or \"My Schema\".\"T\""
        ),
    };
    let (schema, rest) = parse_ident(s).ok_or_else(|| invalid("bad schema name"))?;
    let rest = rest
        .strip_prefix('.')
        .ok_or_else(|| invalid("not schema-qualified"))?;
    let (table, rest) = parse_ident(rest).ok_or_else(|| invalid("bad table name"))?;
    if !rest.is_empty() {
        return Err(invalid("unexpected text after the table name"));
    }
    Ok((schema, table))
}

/// One identifier at the start of `s`, and what follows it.
fn parse_ident(s: &str) -> Option<(String, &str)> {
    if let Some(mut rest) = s.strip_prefix('"') {
        let mut out = String::new();
        loop {
            let end = rest.find('"')?;
            out.push_str(&rest[..end]);
            rest = &rest[end + 1..];
            match rest.strip_prefix('"') {
                Some(r) => {
                    out.push('"');
                    rest = r;
                }
                None => break,
            }
        }
        (!out.is_empty()).then_some((out, rest))
    } else {
        let end = s
            .char_indices()
            .find(|&(i, c)| {
                !(c.is_alphabetic() || c == '_' || (i > 0 && (c.is_ascii_digit() || c == '$')))
            })
            .map_or(s.len(), |(i, _)| i);
        (end > 0).then(|| (s[..end].to_lowercase(), &s[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn qualified_names() {
        assert_eq!(
            parse_qualified_name("public.t").unwrap(),
            pair("public", "t")
        );
        assert_eq!(
            parse_qualified_name("Public.T1").unwrap(),
            pair("public", "t1")
        );
        assert_eq!(
            parse_qualified_name("\"Odd Schema\".\"a\"\"b.c\"").unwrap(),
            pair("Odd Schema", "a\"b.c")
        );
        assert_eq!(parse_qualified_name("s.\"T\"").unwrap(), pair("s", "T"));
        for bad in [
            "t",
            "",
            "a.",
            ".b",
            "a.b.c",
            "a.b; DROP TABLE x",
            "\"a.b",
            "1a.b",
            "a.\"\"",
        ] {
            assert!(parse_qualified_name(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn create_statements() {
        let v12 = crate::pg::Version::major_release(12);
        let v13 = crate::pg::Version::major_release(13);
        assert_eq!(
            create_sql(v12, "p", None),
            "CREATE PUBLICATION \"p\" FOR ALL TABLES"
        );
        assert_eq!(
            create_sql(v13, "p", None),
            "CREATE PUBLICATION \"p\" FOR ALL TABLES WITH (publish_via_partition_root = false)"
        );
        let set: TableSet = [pair("public", "t"), pair("My S", "x\"y")]
            .into_iter()
            .collect();
        assert_eq!(
            create_sql(v12, "p", Some(&set)),
            "CREATE PUBLICATION \"p\" FOR TABLE \"My S\".\"x\"\"y\", \"public\".\"t\""
        );
        assert_eq!(
            create_sql(v12, "p", Some(&TableSet::new())),
            "CREATE PUBLICATION \"p\""
        );
    }
}
