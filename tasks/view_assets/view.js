// Orchard's run view: the run page (index.html) and the tree page (tree.html). Plain JavaScript and SVG, no library.
// Data arrive as script files that call Orchard.loaded(kind, value) (data/index.js, data/trees/<file>.js), so the
// pages work from disk (file://) and when served. Every text that comes from a model or a seed is put on the page
// with textContent (or as an SVG <title>/<text> node's text): never parsed as HTML.
"use strict";

var Orchard = (function () {
  var SVG = "http://www.w3.org/2000/svg";
  var PAGE_SIZE = 100;
  var COLOURS = { correct: "#2e9d4d", incorrect: "#d0413b", unparsable: "#e08a1e" };
  var ROLE_COLOURS = { instruction: "#333", critique: "#7a6fd0", principled: "#2b7bb9", antithesis: "#b95a2b",
    unconditioned: "#888" };
  var METHOD_COLOURS = { rs: "#1f77b4", mcts: "#9467bd", error_injection: "#d62728" };
  var handlers = {};

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function num(value, digits) {
    if (value === null || value === undefined) return "–";
    return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(digits === undefined ? 3 : digits) : String(value);
  }
  function pct(value) { return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%"; }
  function counts(map) {
    var keys = Object.keys(map || {});
    return keys.length ? keys.map(function (k) { return k + " " + map[k]; }).join(", ") : "–";
  }
  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (cell) { tr.appendChild(cell instanceof Node ? cell : el("td", cell)); });
    return tr;
  }
  function short(id) { return id ? String(id).slice(0, 8) : "–"; }

  // --- the run page -------------------------------------------------------------------------------------------------

  var index = { rows: [], shown: [], page: 0, key: null, desc: false };

  function strategyText(strategies) {
    return Object.keys(strategies || {}).sort().map(function (s) {
      return s + " " + strategies[s][0] + "/" + strategies[s][1];
    }).join(", ");
  }
  function sortValue(r, key) {
    var v = r[key];
    if (key === "pairs" || key === "jury") return Object.values(v || {}).reduce(function (a, b) { return a + b; }, 0);
    if (key === "strategies") return strategyText(v);
    return v === undefined ? null : v;
  }
  function searchText(r) {
    return [r.instruction, r.tree, r.instruction_id, r.domain, r.not_grown, r.shard, strategyText(r.strategies)]
      .join(" ").toLowerCase();
  }

  function showRun(page) {
    var run = page.run;
    document.title = "Orchard run " + run.run_id;
    document.getElementById("title").textContent = "Orchard run " + run.run_id + " — " + run.status;
    document.getElementById("subtitle").textContent = "lake snapshot " + run.snapshot_id + ", started " +
      (run.started_at || "–") + ", finished " + (run.finished_at || "–");
    var figures = document.getElementById("figures");
    [["trees", run.trees], ["nodes", run.nodes], ["pairs", run.pairs], ["pairs by method", counts(run.pairs_by_method)],
     ["pass rate", pct(run.pass_rate)], ["principle examples", counts(run.principle_labels)],
     ["jury Fleiss' κ", num(run.fleiss_kappa)], ["prompt tokens", run.prompt_tokens],
     ["completion tokens", run.completion_tokens], ["tokens/s", num(run.tokens_per_s, 1)],
     ["growth wall", num(run.wall_s, 1) + " s"], ["prompt cache", pct(run.cached_share)],
     ["shards", run.shards_planned + " planned, " + run.shards_published + " published, " + (run.shards_reused || 0) +
       " reused, " + run.shards_quarantined + " quarantined, " + run.shards_failed + " failed"]
    ].forEach(function (f) {
      var box = el("div", null, "figure");
      box.appendChild(el("b", f[1] === null || f[1] === undefined ? "–" : f[1]));
      box.appendChild(el("span", f[0]));
      figures.appendChild(box);
    });
    var drops = document.querySelector("#drops tbody");
    page.drops.forEach(function (d) { drops.appendChild(row([d.stage, d.reason, d.count, d.examples.join(", ")])); });
    if (!page.drops.length) drops.appendChild(row(["nothing was dropped", "", "", ""]));
    var fates = document.querySelector("#fates tbody");
    (run.fates || []).forEach(function (f) {
      fates.appendChild(row([f.shard_id, f.fate, num(f.trees), num(f.pairs), f.reason || ""]));
    });

    index.rows = page.trees;
    index.rows.forEach(function (r) { r._search = searchText(r); });
    var domains = {};
    index.rows.forEach(function (r) { if (r.domain) domains[r.domain] = true; });
    var select = document.getElementById("domain");
    Object.keys(domains).sort().forEach(function (d) { var o = el("option", d); o.value = d; select.appendChild(o); });
    document.getElementById("filter").addEventListener("input", function () { index.page = 0; refresh(); });
    select.addEventListener("change", function () { index.page = 0; refresh(); });
    document.getElementById("grown").addEventListener("change", function () { index.page = 0; refresh(); });
    document.getElementById("prev").addEventListener("click", function () { index.page -= 1; render(); });
    document.getElementById("next").addEventListener("click", function () { index.page += 1; render(); });
    document.querySelectorAll("#trees th").forEach(function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        index.desc = index.key === key ? !index.desc : false;
        index.key = key;
        document.querySelectorAll("#trees th").forEach(function (h) { h.className = ""; });
        th.className = index.desc ? "desc" : "asc";
        refresh();
      });
    });
    refresh();
    document.body.setAttribute("data-ready", "run");
    if (window.performance && performance.mark) performance.mark("orchard-table-rendered");
  }

  function refresh() {
    var words = document.getElementById("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    var domain = document.getElementById("domain").value;
    var grown = document.getElementById("grown").value;
    index.shown = index.rows.filter(function (r) {
      if (domain && r.domain !== domain) return false;
      if (grown === "grown" && !r.tree) return false;
      if (grown === "not" && r.tree) return false;
      return words.every(function (w) { return r._search.indexOf(w) >= 0; });
    });
    if (index.key) {
      var key = index.key, sign = index.desc ? -1 : 1;
      index.shown.sort(function (a, b) {
        var x = sortValue(a, key), y = sortValue(b, key);
        if (x === y) return 0;
        if (x === null) return 1;
        if (y === null) return -1;
        return (x < y ? -1 : 1) * sign;
      });
    }
    render();
  }

  function render() {
    var pages = Math.max(1, Math.ceil(index.shown.length / PAGE_SIZE));
    index.page = Math.min(Math.max(index.page, 0), pages - 1);
    var start = index.page * PAGE_SIZE, end = Math.min(start + PAGE_SIZE, index.shown.length);
    var body = document.createElement("tbody");
    index.shown.slice(start, end).forEach(function (r) {
      var first = el("td", null, "instruction");
      if (r.tree) {
        var a = el("a", r.instruction || r.tree);
        a.href = "tree.html#" + encodeURIComponent(r.file);
        a.title = r.instruction || "";
        first.appendChild(a);
      } else {
        first.textContent = r.instruction_id;
      }
      var tr = row([first, r.domain || "–", strategyText(r.strategies) || "–", num(r.k), pct(r.pass_rate),
        num(r.nodes), num(r.critiques), num(r.steps), counts(r.pairs), counts(r.jury), r.not_grown || ""]);
      tr.setAttribute("data-tree", r.tree || "");
      body.appendChild(tr);
    });
    var table = document.getElementById("trees");
    table.replaceChild(body, table.tBodies[0]);
    document.getElementById("count").textContent = index.shown.length + " of " + index.rows.length + " rows";
    document.getElementById("page").textContent = index.shown.length ?
      " rows " + (start + 1) + "–" + end + " (page " + (index.page + 1) + " of " + pages + ") " : " no rows ";
    document.getElementById("prev").disabled = index.page === 0;
    document.getElementById("next").disabled = index.page >= pages - 1;
  }

  // --- the tree page -----------------------------------------------------------------------------------------------

  var tree = { byId: {}, children: {}, pos: {}, selected: null };

  function loadTree() {
    var file = decodeURIComponent(location.hash.slice(1));
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(file)) {
      document.getElementById("title").textContent = "No tree named in the address (tree.html#<tree file>)";
      return;
    }
    var script = document.createElement("script");
    script.src = "data/trees/" + file + ".js";
    script.onerror = function () { document.getElementById("title").textContent = "No tree " + file + " in this view"; };
    document.body.appendChild(script);
  }

  function nodeColour(n) {
    if (n.verdict && COLOURS[n.verdict]) return COLOURS[n.verdict];
    if (n.role === "step" && n.q_value !== null && n.q_value !== undefined) {
      var q = Math.max(0, Math.min(1, n.q_value));  // no verdict of its own: its Q, red (0) to green (1)
      return "hsl(" + Math.round(120 * q) + ", 60%, 45%)";
    }
    return ROLE_COLOURS[n.role] || "#aaa";
  }

  function label(n) {
    // A first-turn action's strategy is written over its group; the others say what they are, briefly.
    if (n.role === "step") return "N" + num(n.visits) + " Q" + num(n.q_value, 2);
    return { instruction: "instruction", action: "", critique: "critique", refinement: "refined", rollout: "",
      injected: "negative", principled: "principle", antithesis: "antithesis", unconditioned: "plain" }[n.role] || n.role;
  }

  function layout(nodes) {
    var roots = [];
    nodes.forEach(function (n) {
      tree.byId[n.id] = n;
      tree.children[n.id] = [];
    });
    nodes.forEach(function (n) {
      if (n.parent && tree.byId[n.parent]) tree.children[n.parent].push(n);
      else roots.push(n);
    });
    var next = 0, deepest = 0, DX = 46, DY = 80;
    function place(n, level) {
      var kids = tree.children[n.id];
      deepest = Math.max(deepest, level);
      if (!kids.length) { tree.pos[n.id] = { x: 30 + DX * next++, y: 40 + DY * level }; return; }
      kids.forEach(function (k) { place(k, level + 1); });
      var first = tree.pos[kids[0].id], last = tree.pos[kids[kids.length - 1].id];
      tree.pos[n.id] = { x: (first.x + last.x) / 2, y: 40 + DY * level };
    }
    roots.forEach(function (r) { place(r, 0); });
    return { width: 60 + DX * Math.max(next, 1), height: 110 + DY * (deepest + 1) };
  }

  function showTree(doc) {
    var t = doc.tree;
    document.title = "Orchard tree " + t.tree;
    document.getElementById("title").textContent = t.domain + " tree " + t.tree;
    document.getElementById("subtitle").textContent = "shard " + t.shard + " · " + num(t.nodes) + " nodes · pass rate " +
      pct(t.pass_rate) + " · k " + num(t.k) + " · difficulty " + num(t.difficulty) + " · pairs " + counts(t.pairs) +
      " · jury " + counts(t.jury);
    document.getElementById("instruction").textContent = t.instruction || "";
    var root = doc.nodes.filter(function (n) { return n.role === "instruction"; })[0];
    document.getElementById("reference").textContent = t.reference ? "reference: " + t.reference : "";
    legend();
    var size = layout(doc.nodes);
    var canvas = svg("svg", { width: size.width, height: size.height, id: "tree-svg" });
    // Edges, then pair arcs, then nodes on top.
    doc.nodes.forEach(function (n) {
      if (!n.parent || !tree.pos[n.parent]) return;
      var a = tree.pos[n.parent], b = tree.pos[n.id];
      canvas.appendChild(svg("path", { "class": "edge", d: "M" + a.x + "," + a.y + " L" + b.x + "," + b.y }));
    });
    strategyLabels(canvas, root);
    doc.pairs.forEach(function (p) { arc(canvas, p, "pair-arc", METHOD_COLOURS[p.method] || "#444"); });
    doc.left_out.forEach(function (p) { arc(canvas, p, "left-out-arc", "#999"); });
    doc.nodes.forEach(function (n) {
      var p = tree.pos[n.id], g = svg("g", { "class": "node", "data-node": n.id, "data-role": n.role });
      var colour = nodeColour(n);
      if (n.role === "injected") {
        g.appendChild(svg("rect", { x: p.x - 8, y: p.y - 8, width: 16, height: 16, fill: colour,
          transform: "rotate(45 " + p.x + " " + p.y + ")" }));
      } else if (n.role === "critique") {
        g.appendChild(svg("rect", { x: p.x - 8, y: p.y - 8, width: 16, height: 16, fill: colour }));
      } else {
        g.appendChild(svg("circle", { cx: p.x, cy: p.y, r: n.role === "rollout" ? 6 : 9, fill: colour }));
      }
      g.appendChild(svg("title", {}, n.role + (n.strategy ? " · " + n.strategy : "") +
        (n.verdict ? " · " + n.verdict : "") + (n.score !== null && n.score !== undefined ? " · score " + num(n.score) : "")));
      g.appendChild(svg("text", { x: p.x, y: p.y + 20, "text-anchor": "middle" }, label(n)));
      g.addEventListener("click", function () { select(n.id, doc); });
      canvas.appendChild(g);
    });
    var holder = document.getElementById("canvas");
    holder.textContent = "";
    holder.appendChild(canvas);
    pairTables(doc);
    principles(doc);
    verdicts(doc);
    document.body.setAttribute("data-ready", "tree");
    if (window.performance && performance.mark) performance.mark("orchard-tree-rendered");
  }

  function strategyLabels(canvas, root) {
    if (!root) return;
    var groups = {};
    tree.children[root.id].forEach(function (n) {
      if (n.role !== "action" || !n.strategy) return;
      var g = groups[n.strategy] || (groups[n.strategy] = { min: Infinity, max: -Infinity, y: tree.pos[n.id].y });
      g.min = Math.min(g.min, tree.pos[n.id].x);
      g.max = Math.max(g.max, tree.pos[n.id].x);
    });
    Object.keys(groups).forEach(function (s) {
      var g = groups[s];
      canvas.appendChild(svg("text", { "class": "strategy-label", x: (g.min + g.max) / 2, y: g.y - 14,
        "text-anchor": "middle" }, s));
    });
  }

  function arc(canvas, p, cls, colour) {
    var a = tree.pos[p.chosen], b = tree.pos[p.rejected];
    if (!a || !b) return;
    var bow = 24 + Math.abs(b.x - a.x) / 4;
    var path = svg("path", { "class": cls, stroke: colour, "data-pair": p.id, "data-method": p.method || "",
      d: "M" + a.x + "," + (a.y + 9) + " Q" + (a.x + b.x) / 2 + "," + (Math.max(a.y, b.y) + bow) + " " + b.x + "," + (b.y + 9),
    });
    path.appendChild(svg("title", {}, (p.method || "left out") + ": chosen " + short(p.chosen) + " over " +
      short(p.rejected) + (p.margin !== undefined ? ", margin " + num(p.margin) + ", contrast " + p.contrast +
      ", shared prefix " + num(p.shared_prefix_tokens) + " tokens" : ", " + p.reason)));
    canvas.appendChild(path);
  }

  function legend() {
    var box = document.getElementById("legend");
    [["correct", COLOURS.correct], ["incorrect", COLOURS.incorrect], ["unparsable", COLOURS.unparsable],
     ["MCTS step: colour by Q (red 0 → green 1)", "hsl(60, 60%, 45%)"], ["critique (square)", ROLE_COLOURS.critique],
     ["hard negative (diamond)", COLOURS.incorrect], ["principled", ROLE_COLOURS.principled],
     ["antithesis", ROLE_COLOURS.antithesis], ["pair rs", METHOD_COLOURS.rs], ["pair mcts", METHOD_COLOURS.mcts],
     ["pair error_injection", METHOD_COLOURS.error_injection], ["pair left out (dashed)", "#999"]].forEach(function (item) {
      var span = el("span", item[0]);
      var swatch = el("i", null, "swatch");
      swatch.style.background = item[1];
      span.insertBefore(swatch, span.firstChild);
      box.appendChild(span);
    });
  }

  function select(id, doc) {
    document.querySelectorAll("svg .node.selected").forEach(function (g) { g.classList.remove("selected"); });
    var g = document.querySelector('svg .node[data-node="' + CSS.escape(id) + '"]');
    if (g) g.classList.add("selected");
    var n = tree.byId[id], box = document.getElementById("details");
    box.textContent = "";
    box.setAttribute("data-node", id);
    box.appendChild(el("h2", n.role + (n.strategy ? " · " + n.strategy : "") + (n.turn ? " · turn " + n.turn : "")));
    var dl = el("dl");
    function field(name, value, long) {
      if (value === null || value === undefined || value === "") return;
      dl.appendChild(el("dt", name));
      var dd = el("dd");
      dd.appendChild(long ? el("pre", value, "text") : el("span", value));
      dd.setAttribute("data-field", name);
      dl.appendChild(dd);
    }
    field("node", n.id);
    field("text", n.text, true);
    field("verdict", n.verdict ? n.verdict + (n.score !== null ? " (score " + num(n.score) + ")" : "") : null);
    field("verifier", n.verifier);
    field("verifier detail", n.verifier_detail, true);
    field("failure reason", n.failure_reason);
    if (n.sandbox_exit_code !== null && n.sandbox_exit_code !== undefined) field("sandbox exit code", n.sandbox_exit_code);
    field("sandbox stdout", n.sandbox_stdout, true);
    field("sandbox stderr", n.sandbox_stderr, true);
    field("feedback to the next turn", n.feedback, true);
    tree.children[id].filter(function (c) { return c.role === "critique"; }).forEach(function (c) {
      field("critique", c.text, true);
    });
    var parent = tree.byId[n.parent];
    if (n.role === "refinement" && parent && parent.role === "critique") field("the critique it answers", parent.text, true);
    field("hard negative edit", n.edit);
    if (n.visits !== null && n.visits !== undefined) {
      field("MCTS", "visits " + n.visits + ", Q " + num(n.q_value) + ", self-evaluation " + num(n.self_eval) +
        ", value " + num(n.value));
    }
    field("system message", n.system, true);
    if (n.model) {
      field("sampling", n.model + ", temperature " + num(n.temperature) + ", top_p " + num(n.top_p) + ", max_tokens " +
        num(n.max_tokens) + ", seed " + num(n.seed) + ", template " + (n.template || "–"));
      field("tokens", num(n.prompt_tokens) + " prompt (" + num(n.cached_tokens) + " cached) + " +
        num(n.completion_tokens) + " completion, finished: " + (n.finish_reason || "–"));
    }
    doc.pairs.filter(function (p) { return p.chosen === id || p.rejected === id; }).forEach(function (p) {
      field("pair", p.method + ": " + (p.chosen === id ? "chosen over " + short(p.rejected) : "rejected for " +
        short(p.chosen)) + ", margin " + num(p.margin));
    });
    box.appendChild(dl);
  }

  function highlight(pairId, on) {
    document.querySelectorAll('svg .pair-arc[data-pair="' + CSS.escape(pairId) + '"]').forEach(function (a) {
      a.classList.toggle("highlight", on);
    });
  }

  function nodeLink(id, doc) {
    var td = el("td");
    var a = el("a", short(id) + (tree.byId[id] ? " " + tree.byId[id].role : ""));
    a.href = "#";
    a.addEventListener("click", function (e) { e.preventDefault(); select(id, doc); });
    td.appendChild(a);
    return td;
  }

  function pairTables(doc) {
    var body = document.querySelector("#pairs tbody");
    doc.pairs.forEach(function (p) {
      var tr = row([p.method, nodeLink(p.chosen, doc), nodeLink(p.rejected, doc), num(p.margin), p.contrast,
        num(p.shared_prefix_tokens), num(p.turn), p.jury_label ? p.jury_label + (p.jury_winner ? " (" + p.jury_winner + ")" : "") : "–"]);
      tr.className = "clickable";
      tr.setAttribute("data-pair", p.id);
      tr.addEventListener("mouseenter", function () { highlight(p.id, true); });
      tr.addEventListener("mouseleave", function () { highlight(p.id, false); });
      body.appendChild(tr);
    });
    if (!doc.pairs.length) body.appendChild(row(["no published pair from this tree", "", "", "", "", "", "", ""]));
    var left = document.querySelector("#left-out tbody");
    doc.left_out.forEach(function (p) {
      left.appendChild(row([p.stage, p.reason, nodeLink(p.chosen, doc), nodeLink(p.rejected, doc)]));
    });
    if (!doc.left_out.length) left.appendChild(row(["none recorded for this tree", "", "", ""]));
  }

  function judgementTable(rows) {
    var table = el("table");
    table.appendChild(row(["judge", "order", "status", "said", "prefers", "same in both orders", "reason"].map(
      function (h) { return el("th", h); })));
    rows.forEach(function (j) {
      table.appendChild(row([j.judge, j.presented === "first_as_a" ? "first shown as A" : "second shown as A", j.status,
        j.winner || "–", j.preference || "–", j.position_consistent === null ? "–" : String(j.position_consistent),
        j.reason || (j.status !== "ok" ? j.raw : "")]));
    });
    return table;
  }

  function principles(doc) {
    var section = document.getElementById("principles");
    if (!doc.examples.length) { section.appendChild(el("p", "No principle examples in this tree.", "hint")); return; }
    doc.examples.forEach(function (e) {
      var box = el("div", null, "example");
      box.setAttribute("data-example", e.id);
      box.appendChild(el("h3", "principle " + e.principle_id + " (" + e.constitution + "): " + (e.label || "not judged") +
        (e.jury_winner ? ", winner " + e.jury_winner : "") + " · votes response " + num(e.votes_response) +
        " / antithesis " + num(e.votes_antithesis) + " / tie " + num(e.votes_tie) + " of " + num(e.judges)));
      box.appendChild(el("p", "principle: " + e.principle));
      box.appendChild(el("p", "antithesis: " + e.antithesis));
      var cols = el("div", null, "cols");
      [["under the principle", e.response], ["under the antithesis", e.antithesis_response],
       ["under no principle", e.unconditioned_response]].forEach(function (c) {
        var col = el("div");
        col.appendChild(el("b", c[0]));
        col.appendChild(el("pre", c[1], "text"));
        cols.appendChild(col);
      });
      box.appendChild(cols);
      box.appendChild(judgementTable(doc.judgements.filter(function (j) { return j.comparison === e.id; })));
      section.appendChild(box);
    });
  }

  function verdicts(doc) {
    var section = document.getElementById("verdicts");
    var examples = {};
    doc.examples.forEach(function (e) { examples[e.id] = true; });
    var groups = {};
    doc.judgements.forEach(function (j) {
      if (!examples[j.comparison]) (groups[j.comparison] = groups[j.comparison] || []).push(j);
    });
    var ids = Object.keys(groups);
    if (!ids.length) { section.appendChild(el("p", "No other comparisons judged in this tree.", "hint")); return; }
    ids.forEach(function (id) {
      var j = groups[id][0], box = el("div", null, "example");
      box.appendChild(el("h3", j.kind + " comparison " + short(id) + " (" + j.criterion + "): " + (j.label || "canary") +
        ", first " + short(j.first) + " vs second " + short(j.second) + (j.expected ? ", expected " + j.expected : "")));
      box.appendChild(judgementTable(groups[id]));
      section.appendChild(box);
    });
  }

  handlers.index = showRun;
  handlers.tree = showTree;

  function loaded(kind, value) {
    var show = handlers[kind];
    if (!show) throw new Error("Orchard: no page shows " + kind);
    var ready = function () { show(value); };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready); else ready();
  }

  if (document.body && document.body.getAttribute("data-page") === "tree") {
    loadTree();
    window.addEventListener("hashchange", function () { location.reload(); });
  }

  return { loaded: loaded };
})();
