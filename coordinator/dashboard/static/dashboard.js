// fedcoord dashboard: live updates of a task page over Server-Sent Events.
// The server renders (and escapes) every panel; this script swaps them in and sets the
// summary fields with textContent. No build step, no dependencies.
(function () {
  "use strict";
  var root = document.getElementById("task");
  var live = document.getElementById("live");
  if (!root || !live) { return; }
  if (root.dataset.final === "true") { live.textContent = "task finished"; return; }
  if (!window.EventSource) { live.textContent = "no live updates in this browser: reload"; return; }

  var source = new EventSource(root.dataset.stream);
  source.addEventListener("open", function () { live.textContent = "live"; });
  source.addEventListener("snapshot", function (event) {
    var message = JSON.parse(event.data);
    Object.keys(message.panels).forEach(function (id) {
      var panel = document.getElementById(id);
      if (panel) { panel.innerHTML = message.panels[id]; }
    });
    document.querySelectorAll("[data-field]").forEach(function (el) {
      var value = message.summary[el.dataset.field];
      if (value !== undefined) { el.textContent = value; }
    });
    root.dataset.seq = String(message.seq);
    root.dataset.final = String(message.final);
    live.textContent = message.final ? "task finished" : "live";
  });
  source.addEventListener("end", function () {
    source.close();
    live.textContent = "task finished";
  });
  source.addEventListener("error", function () {
    if (source.readyState !== EventSource.CLOSED) { live.textContent = "reconnecting…"; }
  });
})();
