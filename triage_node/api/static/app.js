// ICH triage node: shared by every page. Times come from the server in UTC (ISO 8601
// with offset, in <time datetime>); they are shown here in the browser's own time zone,
// with the zone named, because the reading room thinks in local time.
// Plain JavaScript, no libraries (the node serves everything itself).
(function () {
  "use strict";

  var zone = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "UTC";
  var formats = {};

  function formatter(kind) {
    if (!formats[kind]) {
      var options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZoneName: "short", timeZone: zone };
      if (kind !== "time") { options.year = "numeric"; options.month = "2-digit"; options.day = "2-digit"; }
      if (kind !== "minutes") options.second = "2-digit";
      formats[kind] = new Intl.DateTimeFormat(undefined, options);
    }
    return formats[kind];
  }

  // "2026-01-31 14:05 CET" whatever the locale's own order of the parts.
  function localTime(date, kind) {
    var p = {};
    formatter(kind || "minutes").formatToParts(date).forEach(function (part) { p[part.type] = part.value; });
    var clock = p.hour + ":" + p.minute + (p.second ? ":" + p.second : "");
    var day = p.year ? p.year + "-" + p.month + "-" + p.day + " " : "";
    return day + clock + " " + p.timeZoneName;
  }

  function zoneLabel() {
    var short = formatter("time").formatToParts(new Date()).filter(function (part) {
      return part.type === "timeZoneName";
    })[0];
    return zone + (short ? " (" + short.value + ")" : "");
  }

  function applyLocalTimes(root) {
    (root || document).querySelectorAll("time.local[datetime]").forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) return;
      el.textContent = localTime(date, el.getAttribute("data-format"));
      el.title = date.toISOString().replace(".000Z", "Z") + " (UTC)";
    });
  }

  window.Triage = { zone: zone, localTime: localTime, applyLocalTimes: applyLocalTimes };

  document.addEventListener("DOMContentLoaded", function () {
    applyLocalTimes(document);
    var label = document.getElementById("zone");
    if (label) label.textContent = "Times in " + zoneLabel();
    document.querySelectorAll(".zone-name").forEach(function (el) { el.textContent = "(" + zoneLabel() + ")"; });
  });
})();
