// AI Center pages: Airflow's look, set before the first paint (loaded without defer in <head>).
// - Inside Airflow's frame (an external view) the page draws no header of its own: <html class="framed">.
// - Light or dark as Airflow shows it: the parent frame's <html class="dark|light"> (same origin), else
//   the choice Airflow keeps in localStorage ("theme": light, dark or system), else the system's
//   prefers-color-scheme. Followed live: the parent's class, other tabs' storage events, the system.
"use strict";
(function () {
  const root = document.documentElement;
  let framed = false;
  try { framed = window.self !== window.top; } catch (e) { framed = true; }
  if (framed) root.classList.add("framed");

  function parentRoot() {
    try {
      const doc = window.parent && window.parent !== window ? window.parent.document : null;
      return doc ? doc.documentElement : null;
    } catch (e) { return null; }  // another origin: not Airflow's frame
  }
  function fromParent() {
    const p = parentRoot();
    if (!p) return null;
    if (p.classList.contains("dark")) return "dark";
    if (p.classList.contains("light")) return "light";
    return null;
  }
  function stored() {
    try {
      const t = window.localStorage.getItem("theme");
      return t === "dark" || t === "light" ? t : null;
    } catch (e) { return null; }
  }
  const system = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  function apply() {
    const mode = fromParent() || stored() || (system && system.matches ? "dark" : "light");
    root.classList.toggle("dark", mode === "dark");
    root.classList.toggle("light", mode !== "dark");
    root.style.colorScheme = mode;
  }
  apply();
  window.addEventListener("storage", apply);
  if (system && system.addEventListener) system.addEventListener("change", apply);
  const p = parentRoot();
  if (p && window.MutationObserver) {
    new MutationObserver(apply).observe(p, { attributes: true, attributeFilter: ["class", "style"] });
  }

  // The time zone Airflow's UI shows times in: the user's choice (localStorage "timezone", JSON), else the browser's.
  window.aicenterTimeZone = function () {
    try {
      const zone = JSON.parse(window.localStorage.getItem("timezone") || "null");
      if (typeof zone === "string" && zone) {
        new Intl.DateTimeFormat("en-US", { timeZone: zone });  // throws on a zone this browser does not know
        return zone;
      }
    } catch (e) { /* not set, or not a zone */ }
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  };
})();
