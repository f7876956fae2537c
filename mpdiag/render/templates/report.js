// Sorting and filtering of the site table; no library, no network.
(function () {
  "use strict";
  var table = document.getElementById("site-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var headers = table.querySelectorAll("thead tr:nth-child(2) th");
  var filter = document.getElementById("site-filter");
  var kind = document.getElementById("kind-filter");
  var riskyOnly = document.getElementById("risky-filter");
  var shown = document.getElementById("shown-count");

  function key(row, col, numeric) {
    var v = row.cells[col].getAttribute("data-v");
    return numeric ? Number(v) : v;
  }

  function sortBy(th) {
    var col = Number(th.getAttribute("data-col"));
    var numeric = th.getAttribute("data-type") === "num";
    // Numbers start descending (largest first is what one looks for), text ascending.
    var current = th.getAttribute("aria-sort");
    var ascending = current ? current === "descending" : !numeric;
    rows.sort(function (a, b) {
      var x = key(a, col, numeric), y = key(b, col, numeric);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return ascending ? order : -order;
    });
    Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var fragment = document.createDocumentFragment();
    rows.forEach(function (r) { fragment.appendChild(r); });
    body.appendChild(fragment);
  }

  function applyFilter() {
    var text = filter.value.toLowerCase();
    var wanted = kind.value;
    var count = 0;
    rows.forEach(function (r) {
      var visible = r.cells[0].textContent.toLowerCase().indexOf(text) !== -1 &&
        (!wanted || r.cells[1].textContent === wanted) &&
        (!riskyOnly.checked || r.classList.contains("risky"));
      r.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = String(count);
  }

  Array.prototype.forEach.call(headers, function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  [filter, kind, riskyOnly].forEach(function (el) {
    el.addEventListener("input", applyFilter);
    el.addEventListener("change", applyFilter);
  });
  applyFilter();
}());
