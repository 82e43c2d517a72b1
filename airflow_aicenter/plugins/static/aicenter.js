// AI Center pages: progressive enhancement only; every page works without this script.
"use strict";

// Every time is written "YYYY-MM-DD HH:MM:SS UTC" in a <time datetime>; shown in Airflow's time zone, one format.
function aicenterFormatTimes(scope) {
  const zone = window.aicenterTimeZone ? window.aicenterTimeZone() : "UTC";
  let format;
  try {
    format = new Intl.DateTimeFormat("en-CA", {
      timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      second: "2-digit", hourCycle: "h23", timeZoneName: "short",
    });
  } catch (e) { return; }
  (scope || document).querySelectorAll("time[datetime]").forEach((el) => {
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when.getTime())) return;
    const parts = {};
    format.formatToParts(when).forEach((p) => { parts[p.type] = p.value; });
    el.textContent = `${parts.year}-${parts.month}-${parts.day} ${parts.hour}:${parts.minute}:${parts.second} ${parts.timeZoneName}`;
    el.title = when.toISOString().replace(".000Z", "Z");
    el.dataset.zone = zone;
  });
}

function aicenterSeconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 60) return `${value.toFixed(1)} s`;
  const whole = Math.round(value), h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s).padStart(2, "0")}s`;
}

// A running run's page: poll its small JSON endpoint and update progress and charts; stop when the run ends.
function aicenterLive() {
  const section = document.getElementById("live");
  if (!section || section.dataset.status !== "running") return;
  const every = Number(section.dataset.interval || 3000);
  const text = (id, value) => { const el = document.getElementById(id); if (el) el.textContent = value; };
  let timer = null;
  async function poll() {
    let data;
    try {
      const response = await fetch(section.dataset.live, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) return;
      data = await response.json();
    } catch (e) { return; }
    const p = data.progress;
    if (p) {
      if (!document.getElementById("progress")) { window.location.reload(); return; }
      if (p.percent !== null) {
        text("progress-percent", `${Math.round(p.percent)}%`);
        const bar = document.getElementById("progress-bar");
        if (bar) bar.style.width = `${p.percent}%`;
      }
      if (p.step !== null) text("progress-step", `step ${p.step}${p.total ? "/" + p.total : ""}`);
      text("progress-eta", p.eta_seconds !== null && !data.ended ? `· ETA ${aicenterSeconds(p.eta_seconds)}` : "");
      const metrics = document.getElementById("progress-metrics");
      if (metrics) {
        metrics.replaceChildren(...Object.entries(p.metrics).map(([name, value]) => {
          const tag = document.createElement("span");
          tag.className = "tag";
          tag.textContent = `${name} = ${value === null ? "—" : Number(value.toPrecision(4))}`;
          return tag;
        }));
      }
      const updated = document.getElementById("progress-updated");
      if (updated) {
        const time = document.createElement("time");
        time.setAttribute("datetime", new Date(p.updated_at * 1000).toISOString());
        updated.replaceChildren("· updated ", time);
        aicenterFormatTimes(updated);
      }
    }
    const charts = document.getElementById("charts");
    if (charts && typeof data.charts === "string") charts.innerHTML = data.charts;  // drawn by the server, names escaped
    section.dataset.updates = String(Number(section.dataset.updates || 0) + 1);
    if (data.ended) {
      clearInterval(timer);
      window.location.reload();  // the final page: outcome, results, artifacts
    }
  }
  timer = setInterval(poll, every);
}

document.addEventListener("DOMContentLoaded", () => {
  aicenterFormatTimes(document);
  aicenterLive();
  const only = document.getElementById("only-differences");
  const table = document.getElementById("compare");
  if (only && table) {
    only.addEventListener("change", () => table.classList.toggle("only-differences", only.checked));
  }
  // The current section of the page's navigation.
  document.querySelectorAll("header.top nav a.tab").forEach((a) => {
    const path = new URL(a.href).pathname, here = window.location.pathname;
    if (here === path || (path.endsWith("/runs") && here.startsWith(path + "/"))) a.classList.add("current");
  });
});
