//! KubeEdge edges (ADR 0017): the same client code through the same front to two
//! nodes of one cloud, one served by Tether's edge and one by the KubeEdge-protocol
//! edge double (`tether_tests::kubeedge_edge`), each reaching its own instance of
//! the fixture kubelet over plain HTTP (the double speaks nothing else to its
//! kubelet, so Tether's edge gets the same kind of endpoint here). Figures: one
//! logs stream and the small GET rate at concurrency 64, each reported for both
//! edges and as the KubeEdge edge's share of Tether's.

use std::time::Duration;

use tether_tunnel::TunnelLimits;

use crate::Plan;
use crate::figures::phase;
use crate::report::Report;
use crate::requests::{self, GetRate};
use crate::rig::{Dial, Rig, RigOptions, Runtimes, Side};
use crate::stats::{ROLES, ratio};
use crate::streams::{self, Throughput};

/// Concurrency of the small GET comparison.
const GET_CONCURRENCY: usize = 64;
/// The two edges, in the order they are measured and reported.
const EDGES: [&str; 2] = ["tether", "kubeedge"];

/// Starts a rig of its own (a cloud accepting KubeEdge sessions, Tether's edge
/// and the KubeEdge edge double), runs the figure on it and stops it.
pub(crate) async fn figure(
    plan: &Plan,
    limits: &TunnelLimits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let runtimes = Runtimes::new(plan.shared_runtime)?;
    let options = RigOptions {
        edge_plain: true,
        kubeedge: true,
        link: None,
    };
    let rig = phase(
        "kubeedge rig start",
        Duration::from_secs(30),
        Rig::start(limits, runtimes, options),
    )
    .await?;
    let result = on_rig(&rig, plan, report).await;
    rig.stop().await;
    result
}

async fn on_rig(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let kubeedge = rig
        .kubeedge_dial()
        .ok_or_else(|| anyhow::anyhow!("the rig has no KubeEdge edge"))?;
    let dials = [rig.dial.clone(), kubeedge];
    logs(rig, &dials, plan, report).await?;
    small_gets(rig, &dials, plan, report).await
}

fn line(figure: &str, tether: &str, kubeedge: &str, ratio: &str, verdict: &str) {
    println!("{figure:<22} tether {tether:<46} kubeedge {kubeedge:<44} {ratio:<16} {verdict}");
}

/// Per-role CPU cost of each edge's path, as JSON fields and one line.
fn roles(report: &mut Report, key: &str, unit: &str, per_edge: [&[f64; 4]; 2]) {
    for (edge, values) in EDGES.iter().zip(per_edge) {
        for (role, v) in ROLES.iter().zip(values) {
            report.num(&format!("{key}_{edge}_{role}"), *v);
        }
    }
    let split = |v: &[f64; 4]| {
        ROLES
            .iter()
            .zip(v)
            .map(|(r, x)| format!("{r} {x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    line(
        &format!("  {unit} by role"),
        &split(per_edge[0]),
        &split(per_edge[1]),
        "",
        "",
    );
}

/// One logs stream of the logs figure's size, runs interleaved Tether's edge,
/// the KubeEdge edge, Tether's edge, ...
async fn logs(
    rig: &Rig,
    dials: &[Dial; 2],
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let paths = [(&dials[0], Side::Tunnel), (&dials[1], Side::Tunnel)];
    let limit = Duration::from_secs(if plan.quick { 90 } else { 300 });
    let measured = phase(
        "kubeedge logs throughput",
        limit,
        streams::paths_throughput(&paths, plan.log_bytes, plan.log_runs),
    )
    .await?;
    let [t, k]: [Throughput; 2] = measured
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected two throughputs"))?;
    report.put("kubeedge_logs_bytes", plan.log_bytes);
    report.put("kubeedge_logs_runs", plan.log_runs);
    for (edge, x) in EDGES.iter().zip([&t, &k]) {
        report.num(&format!("kubeedge_logs_{edge}_mbps"), x.mbps);
        report.num(
            &format!("kubeedge_logs_{edge}_cpu_ms_per_mb"),
            x.cpu_ms_per_mb,
        );
        report.num(&format!("kubeedge_logs_{edge}_cores_busy"), x.cores);
    }
    let r = ratio(k.mbps, t.mbps);
    report.num("kubeedge_logs_ratio", r);
    let show = |x: &Throughput| {
        format!(
            "{:.0} MB/s ({:.2} ms CPU/MB, {:.2} cores)",
            x.mbps, x.cpu_ms_per_mb, x.cores
        )
    };
    line(
        &format!("ke logs {} MiB x1", plan.log_bytes >> 20),
        &show(&t),
        &show(&k),
        &format!("ratio {r:.2}"),
        &report.verdict("kubeedge_logs_ratio"),
    );
    if rig.roles_separate() {
        roles(
            report,
            "kubeedge_logs_cpu_ms_per_mb",
            "CPU ms/MB",
            [&t.role_ms_per_mb, &k.role_ms_per_mb],
        );
    }
    Ok(())
}

/// Small GETs at concurrency 64, windows alternating Tether's edge, the
/// KubeEdge edge, Tether's edge, ...
async fn small_gets(
    rig: &Rig,
    dials: &[Dial; 2],
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let c = GET_CONCURRENCY;
    let mut windows = [Vec::new(), Vec::new()];
    for _ in 0..plan.get_reps {
        for (i, dial) in dials.iter().enumerate() {
            let window = phase(
                &format!("kubeedge small GET c{c} via {}", EDGES[i]),
                plan.get_warmup + plan.get_window + Duration::from_secs(30),
                requests::small_gets(dial, Side::Tunnel, c, plan.get_warmup, plan.get_window),
            )
            .await?;
            windows[i].push(window);
        }
    }
    let [t, k] = windows.map(GetRate::from_windows);
    for (edge, rate) in EDGES.iter().zip([&t, &k]) {
        report.num(&format!("kubeedge_small_get_{edge}_rps_c{c}"), rate.per_sec);
        report.num(
            &format!("kubeedge_small_get_{edge}_p50_ms_c{c}"),
            rate.latency.p50_ms,
        );
        report.num(
            &format!("kubeedge_small_get_{edge}_p99_ms_c{c}"),
            rate.latency.p99_ms,
        );
        report.num(
            &format!("kubeedge_small_get_{edge}_cpu_us_per_req_c{c}"),
            rate.cpu_us_per_req,
        );
        report.put(
            &format!("kubeedge_small_get_{edge}_reconnects_c{c}"),
            rate.reconnects,
        );
    }
    let key = format!("kubeedge_small_get_ratio_c{c}");
    let r = ratio(k.per_sec, t.per_sec);
    report.num(&key, r);
    let show = |g: &GetRate| {
        format!(
            "{:.0} req/s (p50 {:.2} p99 {:.2} ms, {:.0} us CPU/req, {} reconnects)",
            g.per_sec, g.latency.p50_ms, g.latency.p99_ms, g.cpu_us_per_req, g.reconnects
        )
    };
    line(
        &format!("ke GET /pods c{c}"),
        &show(&t),
        &show(&k),
        &format!("ratio {r:.2}"),
        &report.verdict(&key),
    );
    if rig.roles_separate() {
        roles(
            report,
            &format!("kubeedge_small_get_cpu_us_per_req_c{c}"),
            "CPU us/req",
            [&t.role_us_per_req, &k.role_us_per_req],
        );
    }
    Ok(())
}
