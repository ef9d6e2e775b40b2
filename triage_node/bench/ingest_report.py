"""The ``## Ingest`` section of docs/BENCHMARKS.md, written from a `triage_node.bench.ingest` result."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_table"]


def markdown_table(result: dict[str, Any]) -> str:
    """The Markdown section for ``docs/BENCHMARKS.md``."""
    lines = [
        "## Ingest",
        "",
        f"`triage-node bench ingest --images {result['images']}` on {result['date']} "
        f"({result['machine']['cpus']} CPUs, {result['machine']['platform']}): "
        f"{result['images']} slices of {result['size']} per round, {result['rounds']} rounds, "
        f"{result['sender']}; median of the rounds. Every turn starts after `os.sync()`, "
        "so that no receiver waits on the writeback of another's files. This node includes "
        "its database writes (SQLite, synchronous=FULL) and fsyncs before each C-STORE response.",
        "",
        "| receiver | fsync before response | images/s (median) | CPU ms per image | rounds |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, row in result["results"].items():
        rounds = ", ".join(f"{x:.1f}" for x in row["rounds_images_per_s"])
        durable = "yes" if row["fsync_before_response"] else "no"
        cpu = row.get("cpu_ms_per_image")
        cpu_text = "-" if cpu is None else f"{cpu:.2f}"
        lines.append(f"| {name} | {durable} | {row['images_per_s']:.1f} | {cpu_text} | {rounds} |")
    r = result["ratios"]
    t = result["targets"]
    lines += [
        "",
        f"Ratios: node / Orthanc = {r['node_vs_orthanc']:.2f} "
        f"(target >= 1: {'met' if t['at_least_orthanc'] else 'not met'}), "
        f"node / storescp = {r['node_vs_storescp']:.2f} as a ratio of the medians, "
        f"{r['node_vs_storescp_median_of_rounds']:.2f} as the median of the same-round ratios "
        f"({', '.join(f'{x:.2f}' for x in r['node_vs_storescp_per_round'])}) "
        f"(target >= 0.5 on both: {'met' if t['at_least_half_storescp'] else 'not met'}), "
        f"TCP_NODELAY on accepted sockets = x{r['nodelay_speedup']:.2f}, "
        f"node / bare pynetdicom = {r['node_vs_pynetdicom_floor']:.2f}, "
        f"the node's listener / pynetdicom, both discarding = {r['listener_vs_pynetdicom']:.2f}, "
        f"node / durable floor = {r['node_vs_durable_floor']:.2f}, "
        f"durable floor / storescp = {r['durable_floor_vs_storescp']:.2f}. "
        f"Load average (1 min) before / after the run: "
        f"{result['machine']['load_average_1min_before_after'][0]:.1f} / "
        f"{result['machine']['load_average_1min_before_after'][1]:.1f} "
        "(the machine is shared; receivers take turns within each round so they see the same load).",
        "",
        "CPU ms per image: user and system time of the receiver's process during its "
        "turns, per image (median of the rounds); the node's rows and the bare pynetdicom "
        "SCP run in the benchmark's own process, storescp and Orthanc in theirs. A receiver "
        "that answers one C-STORE at a time cannot beat its own CPU time per image plus "
        "its waits for the disk.",
        "",
        "What separates the rows: before each C-STORE response this node parses the "
        "header, fsyncs the file, renames it, fsyncs the directory and commits the "
        "instance row (SQLite WAL fsync), in that order (the file is written as its "
        "fragments arrive; it is fsynced, and its data set hashed, in the I/O pool while "
        "this thread parses and stages the rows; once durable, its pages leave the page "
        "cache, so that the next object is written into freed pages, not new ones); "
        "Orthanc also fsyncs its "
        "storage area and index; storescp and the two bytes-discarded rows make "
        "nothing durable. The two bytes-discarded rows compare association handling "
        "alone: the node's own data phase (`triage_node/ingest/upper_layer.py`) "
        "against pynetdicom's reactor threads, which poll their queues with 1 ms "
        "sleeps. The gap between the node's listener and the node is the price of "
        "durability: three fsyncs (file, directory, database) and the header parse "
        "per object. The durable-floor row runs that sequence of waits alone in the "
        "node's listener (the spool's own write, fsync, rename and directory fsync, then "
        "a one-row SQLite commit; no parse, digest or ORM): no receiver that keeps the "
        "node's order (file durable, then row committed, then the response) answers "
        "faster on this machine. The node sends each response in one write, so Nagle's algorithm "
        "has nothing to hold back and the two node rows differ only by the machine's "
        "noise (TCP_NODELAY did matter for a pynetdicom listener: 30 -> 59 images/s in DESIGN.md); "
        "on this shared machine the same row varies by up to a factor of two between "
        "rounds, storescp's most of all, so compare the rounds, not only the medians.",
        "",
        "Raw numbers: `docs/bench/ingest.json`.",
        "",
    ]
    return "\n".join(lines)
