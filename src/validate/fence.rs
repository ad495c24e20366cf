//! Who the cutover's fence reaches on the source ([`crate::cutover::fence`]):
//! the roles it will set NOLOGIN, those it cannot, and the logins it never
//! covers (superusers, pgshift's own user).

use super::Check;
use super::server::Server;
use crate::config::Config;
use crate::cutover::fence::{self, Survey};
use crate::db::quote_ident;

/// The fence checks, on the source's connection.
pub async fn checks(source: Option<&Server>, config: &Config) -> Vec<Check> {
    let (Some(s), Some(m)) = (source, config.migration()) else {
        return vec![];
    };
    let listed = &config.cutover().fence_roles;
    match fence::survey(&s.client, &m.databases, listed).await {
        Ok(survey) => from_survey(&survey, config),
        Err(e) => vec![Check::warning(
            "fence_roles",
            "source",
            format!("cannot read which roles the cutover's fence reaches: {e}"),
            "grant pgshift's source user read access to pg_roles, pg_database and pg_stat_activity",
        )],
    }
}

/// At most ten names, then how many more.
fn names<'a>(list: impl IntoIterator<Item = &'a str>) -> String {
    let all: Vec<&str> = list.into_iter().collect();
    let mut s = all.iter().take(10).copied().collect::<Vec<_>>().join(", ");
    if all.len() > 10 {
        s.push_str(&format!(" and {} more", all.len() - 10));
    }
    s
}

fn from_survey(s: &Survey, config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    let cannot: Vec<&str> = s
        .roles
        .iter()
        .filter(|r| !r.can_fence)
        .map(|r| r.name.as_str())
        .collect();
    let fenced = s
        .roles
        .iter()
        .filter(|r| r.can_fence)
        .map(|r| r.name.as_str());
    if cannot.is_empty() {
        out.push(Check::succeeded(
            "fence_roles",
            "source",
            format!(
                "at cutover the fence sets {} role(s) NOLOGIN on the source: {}",
                s.roles.len(),
                names(fenced)
            ),
        ));
    } else {
        let example = quote_ident(cannot[0]);
        out.push(Check::warning(
            "fence_roles",
            "source",
            format!(
                "pgshift's user {} cannot set role(s) {} NOLOGIN (it is one of them, or lacks the privilege): while they can log in, every cutover stops at its fence check",
                s.own_role,
                names(cannot.iter().copied())
            ),
            format!(
                "run pgshift as a superuser on the source, remove them from [cutover] fence_roles, or take their LOGIN away before the cutover (ALTER ROLE {example} NOLOGIN)"
            ),
        ));
    }
    let outside: Vec<&str> = s
        .roles
        .iter()
        .filter(|r| r.can_fence && r.uses_other_databases)
        .map(|r| r.name.as_str())
        .collect();
    if !outside.is_empty() {
        out.push(Check::warning(
            "fence_other_databases",
            "source",
            format!(
                "role(s) {} also use databases outside the migration: after the cutover the fence keeps them from logging in to the source at all",
                names(outside.iter().copied())
            ),
            "give those databases' users roles of their own before the cutover, or migrate those databases too",
        ));
    }
    let mut open: Vec<String> = s.superusers.clone();
    let mut found = String::new();
    if !open.is_empty() {
        found = format!(
            "superuser(s) {} can still log in and write to the source after the cutover: the fence does not cover superusers",
            names(open.iter().map(String::as_str))
        );
    }
    let proxy_own = config.file.proxy.users.iter().any(|u| u.name == s.own_role);
    if proxy_own {
        open.push(s.own_role.clone());
        if !found.is_empty() {
            found.push_str("; ");
        }
        found.push_str(&format!(
            "proxy user {} is pgshift's own user, which the fence never closes: clients logging in as it can write to the source after the cutover",
            s.own_role
        ));
    }
    if !open.is_empty() {
        out.push(Check::warning(
            "fence_unfenced_logins",
            "source",
            found,
            "keep applications off these roles, or list superusers in [cutover] fence_roles to set them NOLOGIN at cutover; give applications a role other than pgshift's user",
        ));
    }
    out
}
