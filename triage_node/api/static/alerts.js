// Opt-in alert when a new STAT-AI study appears in the worklist: a short beep (Web Audio,
// no sound file) and "(N) STAT" in the tab's title until the reader is back on the page.
// The choice is per browser (localStorage), as each reading-room workstation decides.
(function () {
  "use strict";

  var KEY = "triage.statAlert";
  var baseTitle = document.title;
  var known = null;    // STAT-AI studies already listed (null: take the next list as the baseline)
  var unseen = {};     // STAT-AI studies that arrived since the reader last looked
  var audio = null;

  function enabled() {
    try { return window.localStorage.getItem(KEY) === "on"; } catch (e) { return false; }
  }

  function unlockAudio() {
    // Browsers let a page play sound only once the user has interacted with it.
    var Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return null;
    try {
      audio = audio || new Context();
      if (audio.state === "suspended") audio.resume();
    } catch (e) { audio = null; }
    return audio;
  }

  function beep() {
    var ctx = unlockAudio();
    if (!ctx) return;
    var osc = ctx.createOscillator();
    var gain = ctx.createGain();
    osc.type = "sine";
    osc.frequency.value = 880;
    gain.gain.setValueAtTime(0.25, ctx.currentTime);
    gain.gain.exponentialRampToValueAtTime(0.001, ctx.currentTime + 0.5);
    osc.connect(gain);
    gain.connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.5);
  }

  function showCount() {
    var n = Object.keys(unseen).length;
    document.title = n ? "(" + n + ") STAT · " + baseTitle : baseTitle;
  }

  function mark(root) {
    root.querySelectorAll("tr.entry").forEach(function (row) {
      row.classList.toggle("new-stat", Object.prototype.hasOwnProperty.call(unseen, row.dataset.studyUid));
    });
  }

  // Called with the table body after every load of the rows.
  function check(root) {
    var uids = [];
    root.querySelectorAll("tr.entry[data-priority='STAT-AI']").forEach(function (row) {
      uids.push(row.dataset.studyUid);
    });
    if (known === null) {
      known = {};
      uids.forEach(function (uid) { known[uid] = true; });
      return;
    }
    var fresh = uids.filter(function (uid) { return !known[uid]; });
    fresh.forEach(function (uid) { known[uid] = true; });
    if (fresh.length && enabled()) {
      fresh.forEach(function (uid) { unseen[uid] = true; });
      showCount();
      beep();
    }
    mark(root);
  }

  function seen() {
    if (!Object.keys(unseen).length) return;
    unseen = {};
    showCount();
    mark(document);
  }

  // The list changed for another reason (filters, sort): take it as the new baseline.
  function reset() { known = null; }

  window.TriageAlerts = { check: check, reset: reset, seen: seen, enabled: enabled };

  document.addEventListener("DOMContentLoaded", function () {
    var toggle = document.getElementById("stat-alert");
    if (toggle) {
      toggle.checked = enabled();
      toggle.addEventListener("change", function () {
        try { window.localStorage.setItem(KEY, toggle.checked ? "on" : "off"); } catch (e) { /* private mode */ }
        if (toggle.checked) unlockAudio(); else seen();
      });
    }
    ["pointerdown", "keydown"].forEach(function (type) {
      document.addEventListener(type, function () { if (enabled()) unlockAudio(); seen(); }, true);
    });
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible") seen();
    });
  });
})();
