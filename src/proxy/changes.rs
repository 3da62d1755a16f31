//! What a reload changed among the upstreams and their backends, said in
//! a line each, so that a spike after a reload can be told to it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::upstream::Upstream;

/// What a reload changed among the upstreams, in one line, so a spike
/// after it can be told to it (as Envoy logs `cds: add N cluster(s),
/// remove M`, review36a L4). Nothing when nothing changed.
pub(super) fn say_changes(
    config: &Config,
    old: &HashMap<&str, &Arc<Upstream>>,
    kept: &std::collections::HashSet<&str>,
) {
    let names = |list: Vec<&str>| at_most_20(&list);
    let mut added = Vec::new();
    let mut retuned = Vec::new();
    for upstream in &config.upstreams {
        match old.get(upstream.name.as_str()) {
            None => added.push(upstream.name.as_str()),
            Some(before) if before.config != *upstream => retuned.push(upstream.name.as_str()),
            Some(_) => {}
        }
    }
    let mut removed: Vec<&str> = old
        .keys()
        .copied()
        .filter(|name| !kept.contains(name))
        .collect();
    removed.sort_unstable();
    if added.is_empty() && retuned.is_empty() && removed.is_empty() {
        return;
    }
    tracing::info!(
        added = names(added.clone()),
        changed = names(retuned.clone()),
        removed = names(removed),
        "upstreams changed by the reload"
    );
    // Which backends, for the first upstreams changed: a drain said only
    // `changed="app"`, where HAProxy says `Server app/s1 is going DRAIN`
    // (review41b L3).
    for name in retuned.into_iter().take(20) {
        let (Some(before), Some(now)) = (
            old.get(name),
            config.upstreams.iter().find(|u| u.name == name),
        ) else {
            continue;
        };
        say_backend_changes(name, &before.config.backends, now);
    }
}

/// `items` joined by commas, at most 20 of them named: a reload of 20,000
/// upstreams or backends is one line, not hundreds of KB.
fn at_most_20<S: std::borrow::Borrow<str>>(items: &[S]) -> String {
    match items.len() {
        0..=20 => items.join(", "),
        n => format!("{} and {} more", items[..20].join(", "), n - 20),
    }
}

/// One line for what a reload did to the backends of upstream `name`:
/// added, removed, drained (weight 0 now), back in rotation, reweighted,
/// made a backup or a primary, given another `max_conns`; with the
/// `slow_start` those added and undrained warm up over. Nothing when only
/// the upstream's other settings changed.
fn say_backend_changes(
    name: &str,
    before: &[crate::config::Backend],
    upstream: &crate::config::Upstream,
) {
    let now = &upstream.backends;
    let was = |addr| {
        before
            .iter()
            .find(|b: &&crate::config::Backend| b.addr == addr)
    };
    let list = |addrs: Vec<String>| at_most_20(&addrs);
    let (mut added, mut drained, mut undrained, mut reweighted) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // A backup made or unmade, and a cap changed, move traffic as a
    // weight does (review44c L1: said nothing).
    let (mut backup, mut primary, mut recapped) = (Vec::new(), Vec::new(), Vec::new());
    let cap = |max: u32| match max {
        0 => "none".to_owned(),
        n => n.to_string(),
    };
    for backend in now {
        let Some(old) = was(backend.addr) else {
            added.push(backend.addr.to_string());
            continue;
        };
        match (old.weight, backend.weight) {
            (w, now) if w == now => {}
            (w, 0) => drained.push(format!("{} (weight {w})", backend.addr)),
            (0, now) => undrained.push(format!("{} (weight {now})", backend.addr)),
            (w, now) => reweighted.push(format!("{} ({w} to {now})", backend.addr)),
        }
        match (old.backup, backend.backup) {
            (false, true) => backup.push(backend.addr.to_string()),
            (true, false) => primary.push(backend.addr.to_string()),
            _ => {}
        }
        if old.max_conns != backend.max_conns {
            recapped.push(format!(
                "{} ({} to {})",
                backend.addr,
                cap(old.max_conns),
                cap(backend.max_conns)
            ));
        }
    }
    let removed: Vec<String> = before
        .iter()
        .filter(|b| !now.iter().any(|n| n.addr == b.addr))
        .map(|b| b.addr.to_string())
        .collect();
    let lists = [
        &added,
        &removed,
        &drained,
        &undrained,
        &reweighted,
        &backup,
        &primary,
        &recapped,
    ];
    if lists.iter().all(|l| l.is_empty()) {
        return;
    }
    // Those added and undrained warm up: said here, where only `/status`
    // said it.
    let back = added.len() + undrained.len();
    let warming = !upstream.slow_start.is_zero() && back > 0;
    let slow_start = warming.then(|| tracing::field::debug(upstream.slow_start));
    tracing::info!(
        upstream = name,
        slow_start,
        added = list(added),
        removed = list(removed),
        drained = list(drained),
        undrained = list(undrained),
        reweighted = list(reweighted),
        made_backup = list(backup),
        made_primary = list(primary),
        max_conns = list(recapped),
        "backends changed by the reload"
    );
}
