//! Runs each figure per the [`Plan`], records its numbers in the [`Report`] and
//! prints its line: figure, direct, tunnel, ratio, and the target's verdict.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tether_tunnel::TunnelLimits;

use crate::report::Report;
use crate::rig::{Rig, Side};
use crate::stats::{ROLES, mb_per_s, ratio};
use crate::{Figure, Plan, complete, exec, idle, memory, requests, streams, wan};

/// Bounds a phase: a phase that overruns is a harness failure.
pub(crate) async fn phase<T>(
    name: &str,
    limit: Duration,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("{name}: did not finish within {limit:?}"))?
        .with_context(|| format!("{name} failed"))
}

fn line(figure: &str, direct: &str, tunnel: &str, ratio: &str, verdict: &str) {
    println!("{figure:<22} direct {direct:<46} tunnel {tunnel:<46} {ratio:<16} {verdict}");
}

/// Each side's CPU cost split by role, as JSON fields and one line. The direct
/// side has no edge or cloud, so only its client and fixture are recorded.
fn roles(report: &mut Report, key: &str, unit: &str, direct: &[f64; 4], tunnel: &[f64; 4]) {
    for (role, v) in ROLES.iter().zip(direct).take(2) {
        report.num(&format!("{key}_direct_{role}"), *v);
    }
    for (role, v) in ROLES.iter().zip(tunnel) {
        report.num(&format!("{key}_tunnel_{role}"), *v);
    }
    let split = |v: &[f64; 4], n: usize| {
        ROLES
            .iter()
            .zip(v)
            .take(n)
            .map(|(r, x)| format!("{r} {x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    line(
        &format!("  {unit} by role"),
        &split(direct, 2),
        &split(tunnel, 4),
        "",
        "",
    );
}

/// Figure 6: idle session memory, on its own cloud.
pub(crate) async fn idle_sessions(
    plan: &Plan,
    limits: &TunnelLimits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let idle = phase(
        "idle sessions",
        plan.edges_register + Duration::from_secs(60),
        idle::idle_memory(plan.edges, limits, plan.edges_register),
    )
    .await?;
    report.put("idle_sessions", idle.wanted);
    report.put("connected_edges", idle.connected);
    report.put("idle_cloud_rss_before_kib", idle.cloud_before_kib);
    report.put("idle_cloud_rss_after_kib", idle.cloud_after_kib);
    report.num("idle_session_kib", idle.cloud_per_session_kib());
    report.num("idle_edge_session_kib", idle.edge_per_session_kib());
    println!(
        "{:<22} {} of {} edges connected; cloud RSS {} -> {} KiB = {:.1} KiB/session \
         (edge side {:.1} KiB/session)   {}",
        "idle sessions",
        idle.connected,
        idle.wanted,
        idle.cloud_before_kib,
        idle.cloud_after_kib,
        idle.cloud_per_session_kib(),
        idle.edge_per_session_kib(),
        report.verdict("idle_session_kib"),
    );
    Ok(())
}

/// Complete edges and the reconnect storm, on their own cloud (ADR 0022).
pub(crate) async fn complete_edges(
    plan: &Plan,
    limits: &TunnelLimits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let r = phase(
        "complete edges",
        plan.edges_register + Duration::from_secs(240),
        complete::complete_edges(plan.edges, limits, plan.edges_register, true),
    )
    .await?;
    report.put("complete_edges_wanted", r.wanted);
    report.put("complete_edges", r.complete);
    report.num("complete_edge_kib", r.cloud_per_edge_kib());
    report.num("complete_edge_edge_side_kib", r.edge_per_edge_kib);
    println!(
        "{:<22} {} of {} edges complete (tunnel + hub, one connection each); cloud RSS {} -> {} KiB \
         = {:.1} KiB/edge (edge side {:.1})   {}",
        "complete edges",
        r.complete,
        r.wanted,
        r.cloud_before_kib,
        r.cloud_after_kib,
        r.cloud_per_edge_kib(),
        r.edge_per_edge_kib,
        report.verdict("complete_edge_kib"),
    );
    if let Some(s) = &r.storm {
        if let Some(t) = s.reconnect {
            report.num("storm_reconnect_s", t.as_secs_f64());
        }
        report.put("storm_edges_back", s.back);
        report.put("storm_requests", s.requests);
        report.put("storm_request_errors", s.request_errors);
        if let Some(p) = s.request_p99 {
            report.num("storm_request_p99_ms", p.as_secs_f64() * 1000.0);
        }
        println!(
            "{:<22} {} of {} back after a cloud restart in {}; {} requests to edges already back, \
             {} failed, p99 {}   {}",
            "reconnect storm",
            s.back,
            r.complete,
            s.reconnect.map_or_else(
                || "(not all)".to_owned(),
                |t| format!("{:.1} s", t.as_secs_f64())
            ),
            s.requests,
            s.request_errors,
            s.request_p99.map_or_else(
                || "-".to_owned(),
                |p| format!("{:.1} ms", p.as_secs_f64() * 1000.0)
            ),
            report.verdict("storm_reconnect_s"),
        );
    }
    Ok(())
}

/// Figures 1 to 5, on the rig.
pub(crate) async fn on_rig(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut unstalled = None;
    if plan.wants(Figure::Logs) {
        unstalled = Some(logs(rig, plan, report).await?);
    }
    if plan.wants(Figure::Stalled) {
        stalled(rig, plan, unstalled, report).await?;
    }
    if plan.wants(Figure::SmallGet) {
        for c in plan.get_concurrency {
            small_gets(rig, plan, c, report).await?;
        }
    }
    if plan.wants(Figure::Exec) {
        exec_rtt(rig, plan, report).await?;
    }
    if plan.wants(Figure::Concurrent) {
        concurrent(rig, plan, report).await?;
    }
    if plan.wants(Figure::Slowloris) {
        crate::slowloris::figure(rig, plan, report).await?;
    }
    Ok(())
}

fn logs_limit(plan: &Plan) -> Duration {
    Duration::from_secs(if plan.quick { 60 } else { 180 })
}

/// Figure 1; returns the tunnel's MB/s for figure 5.
async fn logs(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<f64> {
    let [d, t] = phase(
        "logs throughput",
        logs_limit(plan),
        streams::logs_throughput(&rig.dial, &plan.sides, plan.log_bytes, plan.log_runs),
    )
    .await?;
    report.put("logs_bytes", plan.log_bytes);
    report.put("logs_runs", plan.log_runs);
    for (side, x) in [("direct", &d), ("tunnel", &t)] {
        report.num(&format!("logs_{side}_mbps"), x.mbps);
        report.num(&format!("logs_{side}_cpu_ms_per_mb"), x.cpu_ms_per_mb);
        report.num(&format!("logs_{side}_cores_busy"), x.cores);
    }
    report.num("logs_throughput_ratio", ratio(t.mbps, d.mbps));
    let show = |x: &streams::Throughput| {
        format!(
            "{:.0} MB/s ({:.2} ms CPU/MB, {:.2} cores)",
            x.mbps, x.cpu_ms_per_mb, x.cores
        )
    };
    line(
        &format!("logs {} MiB x1", plan.log_bytes >> 20),
        &show(&d),
        &show(&t),
        &format!("ratio {:.2}", ratio(t.mbps, d.mbps)),
        &report.verdict("logs_throughput_ratio"),
    );
    if rig.roles_separate() {
        roles(
            report,
            "logs_cpu_ms_per_mb",
            "CPU ms/MB",
            &d.role_ms_per_mb,
            &t.role_ms_per_mb,
        );
    }
    Ok(t.mbps)
}

/// Figure 5, against figure 1's tunnel throughput (measured here if figure 1
/// did not run).
async fn stalled(
    rig: &Rig,
    plan: &Plan,
    unstalled: Option<f64>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let unstalled = match unstalled {
        Some(mbps) => mbps,
        None => {
            let tunnel_only =
                streams::logs_throughput(&rig.dial, &[Side::Tunnel], plan.log_bytes, plan.log_runs);
            phase("logs throughput", logs_limit(plan), tunnel_only).await?[1].mbps
        }
    };
    let s = phase(
        "stalled reader",
        logs_limit(plan),
        streams::stalled_throughput(
            &rig.dial,
            plan.stalled,
            plan.stalled_bytes,
            plan.log_bytes,
            plan.log_runs,
        ),
    )
    .await?;
    report.put("stalled_readers", plan.stalled);
    report.num("stalled_tunnel_mbps", s.stalled_mbps);
    report.num("stalled_reader_ratio", ratio(s.stalled_mbps, unstalled));
    // The same stalled runs against unstalled runs interleaved with them: less
    // exposed to the machine's load drifting between figure 1 and this one.
    report.num("stalled_unstalled_interleaved_mbps", s.unstalled_mbps);
    report.num(
        "stalled_reader_ratio_interleaved",
        ratio(s.stalled_mbps, s.unstalled_mbps),
    );
    line(
        &format!("logs beside {} stalled", plan.stalled),
        "-",
        &format!(
            "{:.0} MB/s (unstalled {unstalled:.0}, interleaved {:.0})",
            s.stalled_mbps, s.unstalled_mbps
        ),
        &format!(
            "ratio {:.2} ({:.2})",
            ratio(s.stalled_mbps, unstalled),
            ratio(s.stalled_mbps, s.unstalled_mbps)
        ),
        &report.verdict("stalled_reader_ratio"),
    );
    Ok(())
}

/// Figure 2 at concurrency `c`: windows alternate direct, tunnel, direct, ...
async fn small_gets(rig: &Rig, plan: &Plan, c: usize, report: &mut Report) -> anyhow::Result<()> {
    let mut windows = [Vec::new(), Vec::new()];
    for _ in 0..plan.get_reps {
        for (i, side) in Side::BOTH.into_iter().enumerate() {
            if !plan.measures(side) {
                continue;
            }
            let window = phase(
                &format!("small GET c{c} {side:?}"),
                plan.get_warmup + plan.get_window + Duration::from_secs(30),
                requests::small_gets(&rig.dial, side, c, plan.get_warmup, plan.get_window),
            )
            .await?;
            windows[i].push(window);
        }
    }
    let [d, t] = windows.map(requests::GetRate::from_windows);
    let r = ratio(t.per_sec, d.per_sec);
    for (side, rate) in [("direct", &d), ("tunnel", &t)] {
        report.num(&format!("small_get_{side}_rps_c{c}"), rate.per_sec);
        report.num(
            &format!("small_get_{side}_p50_ms_c{c}"),
            rate.latency.p50_ms,
        );
        report.num(
            &format!("small_get_{side}_p99_ms_c{c}"),
            rate.latency.p99_ms,
        );
        report.num(
            &format!("small_get_{side}_cpu_us_per_req_c{c}"),
            rate.cpu_us_per_req,
        );
    }
    let key = format!("small_get_ratio_c{c}");
    report.num(&key, r);
    let show = |g: &requests::GetRate| {
        format!(
            "{:.0} req/s (p50 {:.2} p99 {:.2} ms, {:.0} us CPU/req)",
            g.per_sec, g.latency.p50_ms, g.latency.p99_ms, g.cpu_us_per_req
        )
    };
    line(
        &format!("GET /pods c{c}"),
        &show(&d),
        &show(&t),
        &format!("ratio {r:.2}"),
        &report.verdict(&key),
    );
    if rig.roles_separate() {
        roles(
            report,
            &format!("small_get_cpu_us_per_req_c{c}"),
            "CPU us/req",
            &d.role_us_per_req,
            &t.role_us_per_req,
        );
    }
    Ok(())
}

/// Figure 3.
async fn exec_rtt(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let (d, t) = phase(
        "exec round trip",
        Duration::from_secs(120),
        exec::exec_rtt(&rig.dial, plan.exec_trips),
    )
    .await?;
    report.put("exec_round_trips", d.samples);
    report.num("exec_rtt_direct_p50_ms", d.p50_ms);
    report.num("exec_rtt_direct_p99_ms", d.p99_ms);
    report.num("exec_rtt_tunnel_p50_ms", t.p50_ms);
    report.num("exec_rtt_tunnel_p99_ms", t.p99_ms);
    report.num("exec_rtt_p50_added_ms", t.p50_ms - d.p50_ms);
    report.num("exec_rtt_p99_added_ms", t.p99_ms - d.p99_ms);
    line(
        "exec 1 KiB echo",
        &format!("p50 {:.3} p99 {:.3} ms", d.p50_ms, d.p99_ms),
        &format!("p50 {:.3} p99 {:.3} ms", t.p50_ms, t.p99_ms),
        &format!("+{:.3} ms p99", t.p99_ms - d.p99_ms),
        &report.verdict("exec_rtt_p99_added_ms"),
    );
    Ok(())
}

/// Figure 4: bursts alternate direct, tunnel, direct, ...; the fewest streams
/// that completed in any burst and the fastest burst are reported.
async fn concurrent(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let n = plan.concurrent_streams;
    let deadline = Duration::from_secs(if plan.quick { 60 } else { 120 });
    let mut results: [Option<streams::Concurrent>; 2] = [None, None];
    for _ in 0..plan.concurrent_reps {
        for (i, side) in Side::BOTH.into_iter().enumerate() {
            if !plan.measures(side) {
                continue;
            }
            let burst = phase(
                &format!("concurrent streams {side:?}"),
                deadline + Duration::from_secs(30),
                streams::concurrent_streams(&rig.dial, side, n, plan.concurrent_bytes, deadline),
            )
            .await?;
            results[i] = Some(match results[i].take() {
                None => burst,
                Some(prev) => streams::Concurrent {
                    ok: prev.ok.min(burst.ok),
                    elapsed: prev.elapsed.min(burst.elapsed),
                    first_error: prev.first_error.or(burst.first_error),
                },
            });
        }
    }
    let [d, t] = results.map(Option::unwrap_or_default);
    let total = n as u64 * plan.concurrent_bytes;
    let (ds, ts) = (d.elapsed.as_secs_f64(), t.elapsed.as_secs_f64());
    report.put("concurrent_streams", n);
    report.put("concurrent_streams_direct_ok", d.ok);
    report.put("concurrent_streams_ok", t.ok);
    report.num("concurrent_direct_s", ds);
    report.num("concurrent_tunnel_s", ts);
    report.num("concurrent_direct_mbps", mb_per_s(total, d.elapsed));
    report.num("concurrent_tunnel_mbps", mb_per_s(total, t.elapsed));
    report.num("concurrent_throughput_ratio", ratio(ds, ts));
    let show = |c: &streams::Concurrent| {
        format!(
            "{}/{n} ok in {:.2} s ({:.0} MB/s)",
            c.ok,
            c.elapsed.as_secs_f64(),
            mb_per_s(total, c.elapsed)
        )
    };
    line(
        &format!("{n} x {} MiB streams", plan.concurrent_bytes >> 20),
        &show(&d),
        &show(&t),
        &format!("ratio {:.2}", ratio(ds, ts)),
        &report.verdict("concurrent_streams_ok"),
    );
    for (side, c) in [("direct", &d), ("tunnel", &t)] {
        if let Some(e) = &c.first_error {
            println!("  {side}: first failed stream: {e}");
        }
    }
    Ok(())
}

/// Figure 7: each role's peak RSS under load and its RSS after the load, in
/// child processes of their own (issue 11 item 10).
pub(crate) async fn memory(
    plan: &Plan,
    limits: &TunnelLimits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (streams, bytes) = (plan.concurrent_streams, plan.concurrent_bytes);
    let m = phase(
        "memory",
        memory::AFTER_LOAD + Duration::from_secs(150),
        memory::memory_figure(limits, streams, bytes),
    )
    .await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let quotient = |after: u64, idle: u64| after as f64 / idle.max(1) as f64;
    report.put("memory_streams", m.streams);
    report.put("memory_streams_ok", m.streams_ok);
    report.put("memory_stream_bytes", m.stream_bytes);
    report.put("memory_stalled_streams", m.stalled);
    report.num("edge_peak_rss_mib_100_streams", mib(m.edge_peak));
    report.num("cloud_peak_rss_mib_stalled", mib(m.cloud_peak));
    report.num("rss_idle_mib_edge", mib(m.edge_idle));
    report.num("rss_idle_mib_cloud", mib(m.cloud_idle));
    report.num("rss_after_load_mib_edge", mib(m.edge_after));
    report.num("rss_after_load_mib_cloud", mib(m.cloud_after));
    let (qe, qc) = (
        quotient(m.edge_after, m.edge_idle),
        quotient(m.cloud_after, m.cloud_idle),
    );
    report.num("rss_after_load_ratio_edge", qe);
    report.num("rss_after_load_ratio_cloud", qc);
    report.num("rss_after_load_ratio", qe.max(qc));
    // The allowance beside the ratio: after <= 2 x idle + 16 MiB.
    let within = |after: u64, idle: u64| mib(after) <= 2.0 * mib(idle) + 16.0;
    report.put(
        "rss_after_load_within_2x_plus_16mib",
        within(m.edge_after, m.edge_idle) && within(m.cloud_after, m.cloud_idle),
    );
    println!(
        "{:<22} {} of {} x {} MiB ok; edge idle {:.1} peak {:.1} after {:.1} MiB   {}",
        "memory (edge)",
        m.streams_ok,
        m.streams,
        m.stream_bytes >> 20,
        mib(m.edge_idle),
        mib(m.edge_peak),
        mib(m.edge_after),
        report.verdict("edge_peak_rss_mib_100_streams"),
    );
    println!(
        "{:<22} {} stalled; cloud idle {:.1} peak {:.1} after {:.1} MiB; after/idle \
         edge {qe:.2} cloud {qc:.2}   {}",
        "memory (after load)",
        m.stalled,
        mib(m.cloud_idle),
        mib(m.cloud_peak),
        mib(m.cloud_after),
        report.verdict("rss_after_load_ratio"),
    );
    Ok(())
}

/// Figure 8: one logs stream across the emulated long link, on a rig whose
/// edge and direct side both cross it (issue 13 item 3).
pub(crate) async fn wan(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let w = &plan.wan;
    let sides = plan.sides.len() as u32;
    // Warm-up plus every run may hit the deadline.
    let limit = (w.limit + Duration::from_secs(10)) * sides * (w.runs as u32 + 1);
    let [d, t] = phase(
        "wan logs",
        limit,
        wan::wan_logs(&rig.dial, &plan.sides, w.bytes, w.runs, w.limit),
    )
    .await?;
    let rtt_ms = (w.link.one_way * 2).as_secs_f64() * 1e3;
    let rate = w.link.rate.unwrap_or(0) as f64 / 1e6;
    report.num("wan_rtt_ms", rtt_ms);
    report.num("wan_rate_cap_mbps", rate);
    report.put("wan_queue_bytes", w.link.queue_bytes);
    report.put("wan_logs_bytes", w.bytes);
    report.put("wan_logs_runs", w.runs);
    report.num("wan_logs_limit_s", w.limit.as_secs_f64());
    for (side, x) in [("direct", &d), ("tunnel", &t)] {
        report.num(&format!("wan_logs_{side}_mbps"), x.mbps());
        report.put(&format!("wan_logs_{side}_bytes"), x.bytes);
        report.put(&format!("wan_logs_{side}_complete"), x.complete);
        report.num(
            &format!("wan_logs_{side}_handshake_ms"),
            x.handshake.as_secs_f64() * 1e3,
        );
    }
    report.num("wan_logs_ratio", ratio(t.mbps(), d.mbps()));
    let show = |x: &wan::WanRun| {
        format!(
            "{:.1} MB/s ({} MiB in {:.1} s{})",
            x.mbps(),
            x.bytes >> 20,
            x.elapsed.as_secs_f64(),
            if x.complete { "" } else { ", cut off" }
        )
    };
    line(
        &format!(
            "wan {rtt_ms:.0} ms {rate:.0} MB/s logs {} MiB",
            w.bytes >> 20
        ),
        &show(&d),
        &show(&t),
        &format!("ratio {:.3}", ratio(t.mbps(), d.mbps())),
        &report.verdict("wan_logs_ratio"),
    );
    Ok(())
}
