// The worklist: rows refreshed every few seconds, sorted and filtered on the server
// (the same query string as the page's own, so a view can be bookmarked), keyboard
// selection, live waiting times and the quick agree/disagree buttons.
(function () {
  "use strict";

  // First click: most probable first, longest waiting first; the others A to Z, oldest first.
  var FIRST_DESC = { probability: true, finding: true, waiting: true };

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

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.querySelector("table.worklist");
    if (!table) return;
    var body = document.getElementById("worklist-rows");
    var form = document.getElementById("worklist-filters");
    var search = document.getElementById("search");
    var alerts = window.TriageAlerts;
    var loadedAt = Date.now();
    var selected = null;  // StudyInstanceUID of the selected row
    var pending = null;   // the refresh in flight, so a late answer never overwrites a newer one
    var typingTimer = null;

    // Dates in the filter are days in this browser's zone; the server needs to know which.
    var tz = document.getElementById("tz");
    var zoneChanged = tz.value !== window.Triage.zone;
    tz.value = window.Triage.zone;

    function query() {
      var params = new URLSearchParams();
      new FormData(form).forEach(function (value, key) { if (value !== "") params.append(key, value); });
      return params.toString();
    }

    function rows() { return Array.prototype.slice.call(body.querySelectorAll("tr.entry")); }

    function select(uid, scroll) {
      selected = uid;
      rows().forEach(function (row) {
        var on = row.dataset.studyUid === uid;
        row.classList.toggle("selected", on);
        row.setAttribute("aria-selected", on ? "true" : "false");
        if (on && scroll) row.scrollIntoView({ block: "nearest" });
      });
    }

    function move(step) {
      var list = rows();
      if (!list.length) return;
      var at = list.findIndex(function (row) { return row.dataset.studyUid === selected; });
      var next = at < 0 ? (step > 0 ? 0 : list.length - 1) : Math.min(list.length - 1, Math.max(0, at + step));
      select(list[next].dataset.studyUid, true);
    }

    function showSort() {
      var key = form.elements.sort.value, order = form.elements.order.value;
      table.querySelectorAll("th[data-sort]").forEach(function (th) {
        if (th.dataset.sort === key) th.setAttribute("aria-sort", order === "asc" ? "ascending" : "descending");
        else th.removeAttribute("aria-sort");
      });
    }

    function loaded(html, total) {
      body.innerHTML = html;
      loadedAt = Date.now();
      window.Triage.applyLocalTimes(body);
      if (selected) select(selected, false);
      var count = document.getElementById("total");
      if (count) count.textContent = total !== null ? total : String(rows().length);
      var stamp = document.getElementById("refreshed");
      if (stamp) {
        stamp.setAttribute("datetime", new Date().toISOString());
        window.Triage.applyLocalTimes(stamp.parentNode);
      }
      if (alerts) alerts.check(body);
    }

    function refresh() {
      var url = table.getAttribute("data-rows-url") + "?" + query();
      var mine = pending = fetch(url, { credentials: "same-origin" })
        .then(function (response) {
          if (response.redirected || !response.ok) { window.location.reload(); return; }
          return response.text().then(function (html) {
            if (mine === pending) loaded(html, response.headers.get("X-Total-Count"));
          });
        })
        .catch(function () { /* keep the last list on a network blip */ });
      return mine;
    }

    // A changed view: new URL (bookmarkable), new alert baseline, rows at once.
    function changed() {
      shownQuery = query();
      window.history.replaceState(null, "", "/worklist?" + shownQuery);
      showSort();
      if (alerts) alerts.reset();
      refresh();
    }

    form.addEventListener("submit", function (event) { event.preventDefault(); changed(); });
    form.addEventListener("change", function (event) { if (event.target !== search) changed(); });
    // Typing waits for a pause; Escape in a search box clears it (Chromium) without an input event.
    var shownQuery = query();
    function typed(delay) {
      clearTimeout(typingTimer);
      typingTimer = setTimeout(function () { if (query() !== shownQuery) changed(); }, delay);
    }
    search.addEventListener("input", function () { typed(250); });
    search.addEventListener("search", function () { typed(0); });

    table.querySelector("thead").addEventListener("click", function (event) {
      var th = event.target.closest("th[data-sort]");
      if (!th) return;
      event.preventDefault();
      var key = th.dataset.sort;
      var order = form.elements.order;
      if (form.elements.sort.value === key) order.value = order.value === "asc" ? "desc" : "asc";
      else order.value = FIRST_DESC[key] ? "desc" : "asc";
      form.elements.sort.value = key;
      changed();
    });

    body.addEventListener("click", function (event) {
      var button = event.target.closest("button.fb");
      var row = event.target.closest("tr.entry");
      if (!row) return;
      if (button) { feedback(row, button); return; }
      if (event.target.closest("a, button")) return;
      window.location.href = row.getAttribute("data-href");
    });

    function feedback(row, button) {
      var data = new FormData();
      data.append("verdict", button.dataset.verdict);
      button.disabled = true;
      fetch("/studies/" + encodeURIComponent(row.dataset.studyUid) + "/feedback", {
        method: "POST", body: data, credentials: "same-origin", headers: { Accept: "application/json" },
      }).then(function (response) {
        button.disabled = false;
        if (!response.ok) { button.title = "Not recorded (" + response.status + ")"; return; }
        row.querySelectorAll("button.fb").forEach(function (b) {
          var on = b === button;
          b.classList.toggle("chosen", on);
          b.setAttribute("aria-pressed", on ? "true" : "false");
        });
      }).catch(function () { button.disabled = false; });
    }

    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey) return;
      if (typing(event.target)) {
        if (event.key === "Escape") {
          event.target.blur();
          if (event.target === search) typed(0);
        }
        return;
      }
      if (event.key === "Enter" && event.target.closest && event.target.closest("a, button")) return;
      if (event.key === "/") { event.preventDefault(); search.focus(); search.select(); }
      else if (event.key === "j" || event.key === "ArrowDown") { event.preventDefault(); move(1); }
      else if (event.key === "k" || event.key === "ArrowUp") { event.preventDefault(); move(-1); }
      else if (event.key === "Enter" && selected) {
        var row = rows().find(function (r) { return r.dataset.studyUid === selected; });
        if (row) window.location.href = row.getAttribute("data-href");
      }
    });

    if (zoneChanged && (form.elements.from.value || form.elements.to.value)) changed();
    else if (alerts) alerts.check(body);
    setInterval(function () {
      var elapsed = (Date.now() - loadedAt) / 1000;
      body.querySelectorAll("td.wait[data-seconds]").forEach(function (cell) {
        cell.textContent = humanWait(Number(cell.getAttribute("data-seconds")) + elapsed);
      });
    }, 1000);
    setInterval(refresh, Number(table.getAttribute("data-refresh") || "10") * 1000);
  });
})();
