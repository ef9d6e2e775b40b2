// ICH triage node: row clicks, live waiting times and auto-refresh of the worklist.
// Plain JavaScript, no libraries (the node serves everything itself).
(function () {
  "use strict";

  function humanWait(seconds) {
    seconds = Math.floor(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) {
      var m = Math.floor((seconds % 3600) / 60);
      return Math.floor(seconds / 3600) + " h " + (m < 10 ? "0" : "") + m + " min";
    }
    return Math.floor(seconds / 86400) + " d " + Math.floor((seconds % 86400) / 3600) + " h";
  }

  function bindRows(root) {
    root.querySelectorAll("tr.entry[data-href]").forEach(function (row) {
      row.addEventListener("click", function (event) {
        if (event.target.closest("a, button")) return;
        window.location.href = row.getAttribute("data-href");
      });
    });
  }

  function tickWaiting(started) {
    var elapsed = (Date.now() - started) / 1000;
    document.querySelectorAll("td.wait[data-seconds]").forEach(function (cell) {
      cell.textContent = humanWait(Number(cell.getAttribute("data-seconds")) + elapsed);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.querySelector("table.worklist");
    if (!table) return;
    var body = document.getElementById("worklist-rows");
    var loadedAt = Date.now();
    bindRows(body);
    setInterval(function () { tickWaiting(loadedAt); }, 1000);
    var every = Number(table.getAttribute("data-refresh") || "10") * 1000;
    setInterval(function () {
      fetch(table.getAttribute("data-rows-url"), { credentials: "same-origin" })
        .then(function (response) {
          if (response.redirected || !response.ok) { window.location.reload(); return null; }
          return response.text();
        })
        .then(function (html) {
          if (html === null) return;
          body.innerHTML = html;
          loadedAt = Date.now();
          bindRows(body);
          var total = document.getElementById("total");
          if (total) total.textContent = String(body.querySelectorAll("tr.entry").length);
          var stamp = document.getElementById("refreshed");
          if (stamp) stamp.textContent = new Date().toISOString().substring(11, 19);
        })
        .catch(function () { /* keep the last list on a network blip */ });
    }, every);
  });
})();
