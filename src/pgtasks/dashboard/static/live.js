// pgtasks dashboard: live refresh of the pages marked data-live (the queues, a queue's jobs,
// the schedules, the workers). Off until the "live" box is ticked; the choice is kept in
// localStorage. A page with a box ticked (jobs selected to cancel) is not refreshed.
// The pages work without this script: reload them to refresh.
(function () {
  "use strict";
  var body = document.body;
  var seconds = parseFloat(body.getAttribute("data-live") || "0");
  var toggle = document.getElementById("live-toggle");
  if (!seconds || !toggle) { return; }
  toggle.parentElement.hidden = false;
  toggle.checked = window.localStorage.getItem("pgtasks-live") === "1";
  var timer = null;

  function refresh() {
    // jobs ticked for a cancel would be unticked by a refresh: wait until none is
    if (document.querySelector("#content input[type=checkbox]:checked")) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "x-pgtasks-live": "1" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.getElementById("content");
        if (fresh) { document.getElementById("content").replaceWith(fresh); }
      })
      .catch(function () { /* the next tick tries again */ });
  }

  function schedule() {
    if (timer !== null) { window.clearInterval(timer); timer = null; }
    if (toggle.checked) { timer = window.setInterval(refresh, seconds * 1000); }
  }

  toggle.addEventListener("change", function () {
    window.localStorage.setItem("pgtasks-live", toggle.checked ? "1" : "0");
    schedule();
  });
  schedule();
})();
