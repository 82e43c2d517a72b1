// AI Center pages: progressive enhancement only; every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const only = document.getElementById("only-differences");
  const table = document.getElementById("compare");
  if (only && table) {
    only.addEventListener("change", () => table.classList.toggle("only-differences", only.checked));
  }
});
