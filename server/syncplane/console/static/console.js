// syncplane console: live rows from the server's event stream, the Start/Stop toggle, local times,
// the edit page's tabs and field errors, the workflow page's chart and dead letters.
// Plain JavaScript, no build step; every page works without it (forms post and redirect).
"use strict";
(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const num = (n) => Number(n).toLocaleString();
  const local = (iso) => (iso ? new Date(iso).toLocaleString() : "unknown");

  function say(text, isError) {
    const box = $("#message");
    if (!box) return;
    box.textContent = text;
    box.classList.toggle("error", !!isError);
  }

  function age(iso) {
    if (!iso) return "-";
    let s = Math.max(0, Math.floor((Date.now() - new Date(iso).getTime()) / 1000));
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (s >= size) return Math.floor(s / size) + unit;
    }
    return s + "s";
  }

  function localTimes(root) {
    $$("time[datetime]", root).forEach((t) => {
      if (t.dataset.field === "age") {
        t.textContent = age(t.getAttribute("datetime"));
        t.title = "created " + local(t.getAttribute("datetime"));
      } else if (t.getAttribute("datetime")) {
        t.textContent = local(t.getAttribute("datetime"));
      }
    });
    $$(".status[data-since]", root).forEach((s) => {
      s.title = s.textContent + " since " + local(s.dataset.since);
    });
  }

  // --- one row (or the workflow page's head) from the server's row dict ---
  // The rows follow the event stream only (ordered by revision): a POST's answer can be older
  // than an event already shown, so it never paints the row; it only marks the toggle busy
  // until the stream (or, failing that, a fresh GET) brings the change.
  function applyRow(el, row) {
    el.dataset.row = JSON.stringify(row);
    $$("form[data-toggle]", el).forEach((f) => { f.dataset.busy = "0"; });
    const set = (field, fn) => $$('[data-field="' + field + '"]', el).forEach(fn);
    set("phase", (s) => {
      s.textContent = row.phase;
      s.className = "status status-" + row.phase.toLowerCase();
      s.dataset.since = row.phaseSince;
      s.title = row.phase + " since " + local(row.phaseSince);
    });
    set("degraded", (d) => { d.textContent = row.degraded; d.hidden = !row.degraded; });
    for (const f of ["backlog", "recordsPerSecond", "deadLetters", "observedGeneration", "appliedGeneration"]) {
      set(f, (c) => { c.textContent = num(row[f]); });
    }
    set("type", (c) => { c.textContent = row.type; });
    const toggle = $("form[data-toggle]", el);
    if (toggle) {
      toggle.action = "/workflows/" + row.id + "/" + row.toggle.action;
      toggle.elements.expected_phase.value = row.toggle.expectedPhase;
      const b = $('[data-field="toggle"]', toggle);
      const label = row.toggle.action === "stop" ? "Stop" : "Start";
      b.textContent = label;
      b.className = "btn btn-" + row.toggle.action;
      b.setAttribute("aria-label", label + " " + row.id);
      b.disabled = !row.toggle.enabled || toggle.dataset.busy === "1";
    }
    set("drift", (w) => {
      w.hidden = !row.drift.length;
      w.title = row.driftTooltip;
      w.setAttribute("aria-label", row.driftTooltip || "no edits pending");
    });
  }

  // --- the workflow page's live status beyond the row (present.live), from its event stream ---
  function fillBody(body, rows, empty, columns) {
    if (!body) return;
    const trs = rows.map((r) => {
      const tr = document.createElement("tr");
      columns(r).forEach(([tag, text, cls], i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        if (cls) cell.className = cls;
        if (tag === "time") {
          const t = document.createElement("time");
          t.setAttribute("datetime", text);
          t.textContent = local(text);
          cell.append(t);
        } else {
          cell.textContent = text;
        }
        tr.append(cell);
      });
      return tr;
    });
    if (!trs.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = columns({}).length;
      td.textContent = empty;
      tr.append(td);
      trs.push(tr);
    }
    body.replaceChildren(...trs);
  }

  function applyLive(el, d) {
    const set = (field, text) => $$('[data-field="' + field + '"]', el).forEach((n) => { n.textContent = text; });
    set("readyWorkers", num(d.readyWorkers));
    set("desiredWorkers", num(d.desiredWorkers));
    for (const c of ["read", "written", "failed", "deadLettered"]) set("counters." + c, num(d.counters[c]));
    $$('[data-field="lastError"]', el).forEach((dd) => {
      if (!d.lastError) { dd.textContent = "none"; return; }
      const t = document.createElement("time");
      t.setAttribute("datetime", d.lastError.time);
      t.textContent = local(d.lastError.time);
      dd.replaceChildren(d.lastError.reason + ": " + d.lastError.message + " (", t, ")");
    });
    fillBody($("#condition-rows", el), d.conditions, "none yet",
      (c) => [["", c.type], ["", c.status], ["", c.reason], ["", c.message], ["time", c.since]]);
    fillBody($("#table-rows", el), d.tables, "no full read yet",
      (t) => [["", t.table], ["", t.rows === undefined ? "" : num(t.rows), "num"]]);
  }

  function rowFor(row) {
    let el = document.getElementById("wf-" + row.id);
    if (el) return el;
    const table = $("table.workflows tbody");
    const tpl = $("#row-template");
    if (!table || !tpl) return null;
    const html = tpl.innerHTML.split("__id__").join(row.id);
    table.insertAdjacentHTML("beforeend", html);
    el = document.getElementById("wf-" + row.id);
    $$('input[name="csrf"]', el).forEach((i) => { i.value = csrf(); });
    bindToggles(el);
    return el;
  }

  function live() {
    const scope = $("[data-live]");
    if (!scope || !window.EventSource) return;
    const which = scope.dataset.live;
    const url = "/events" + (which === "all" ? "" : "?name=" + encodeURIComponent(which));
    const source = new EventSource(url);   // reconnects by itself, sending Last-Event-ID
    source.addEventListener("change", (ev) => {
      const change = JSON.parse(ev.data);
      if (change.type === "DELETED") {
        const gone = document.getElementById("wf-" + change.row.id);
        if (gone && gone.tagName === "TR") gone.remove();
        return;
      }
      const el = rowFor(change.row);
      if (el) applyRow(el, change.row);
      if (el && change.live) applyLive(el, change.live);
      document.dispatchEvent(new CustomEvent("syncplane:row", { detail: change.row }));
    });
    source.addEventListener("reset", () => { source.close(); location.reload(); });
  }

  // --- POST with the CSRF token; JSON back ---
  async function post(url, data) {
    const res = await fetch(url, {
      method: "POST", body: data, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf(), "Accept": "application/json" },
    });
    let body = {};
    try { body = await res.json(); } catch (e) { body = { message: res.statusText }; }
    return { ok: res.ok, body };
  }

  async function lifecycle(form, verb) {
    const el = form.closest("[data-row]");
    const data = new FormData(form);
    const url = "/workflows/" + el.dataset.id + "/" + verb;
    form.dataset.busy = "1";
    $('[data-field="toggle"]', form).disabled = true;
    const { ok, body } = await post(url, data);
    if (ok) {
      say(verb.charAt(0).toUpperCase() + verb.slice(1) + " requested for " + el.dataset.id + ".");
      setTimeout(async () => {
        if (form.dataset.busy !== "1") return;
        const res = await fetch("/api/workflows/" + el.dataset.id, { headers: { Accept: "application/json" } });
        if (res.ok) applyRow(el, await res.json());
      }, 5000);
    } else {
      applyRow(el, JSON.parse(el.dataset.row));
      say(body.message || "The request failed.", true);
    }
  }

  function bindToggles(root) {
    $$("form[data-toggle]", root).forEach((form) => {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const row = JSON.parse(form.closest("[data-row]").dataset.row);
        const dialog = $("#drift-dialog");
        if (row.toggle.action === "stop" && row.drift.length && dialog && dialog.showModal) {
          $("#drift-text").textContent = "Edited: " + row.drift.join(", ") +
            ". These apply at the next start. Restart to apply them now, or stop the workflow.";
          dialog.returnValue = "";
          dialog.onclose = () => {
            if (dialog.returnValue === "restart" || dialog.returnValue === "stop") {
              lifecycle(form, dialog.returnValue);
            }
          };
          dialog.showModal();
          return;
        }
        lifecycle(form, row.toggle.action);
      });
    });
  }

  // --- edit page: tabs and field errors next to their fields ---
  function editPage() {
    const form = $("#edit-form");
    if (!form) return;
    const tabs = $$('[role="tab"]', form);
    const select = (tab) => {
      tabs.forEach((t) => {
        const on = t === tab;
        t.setAttribute("aria-selected", on ? "true" : "false");
        t.tabIndex = on ? 0 : -1;
        document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
      });
      $("#mode").value = tab.id === "tab-yaml" ? "yaml" : "form";
    };
    tabs.forEach((t, i) => {
      t.addEventListener("click", () => select(t));
      t.addEventListener("keydown", (ev) => {
        if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
        const next = tabs[(i + (ev.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
        select(next);
        next.focus();
      });
    });
    const errors = JSON.parse(form.dataset.errors || "[]");
    let first = null;
    const yamlMode = $("#mode").value === "yaml";
    if (yamlMode) {
      // The text was submitted from the YAML tab: the form's fields are hidden (and hold the stored
      // spec), so the violations stay in the list under the text, each with its field path.
      const text = $("#spec", form);
      if (errors.length && text) {
        text.setAttribute("aria-invalid", "true");
        text.setAttribute("aria-describedby", "form-errors");
        text.focus();
      }
    }
    (yamlMode ? [] : errors).forEach((e) => {
      // The violation's own field, else the closest enclosing one that has a place for errors.
      let path = e.field;
      let slot = null;
      while (path && !(slot = form.querySelector('[data-error-for="' + CSS.escape(path) + '"]'))) {
        path = path.replace(/(\.[^.[\]]+|\[\d+\])$/, "");
        if (path === e.field) break;
      }
      const input = slot ? form.querySelector('[data-path="' + CSS.escape(path) + '"]') : null;
      if (!slot) return;
      slot.hidden = false;
      slot.id = slot.id || "err-" + path.replace(/[^a-zA-Z0-9]/g, "-");
      slot.textContent = (slot.textContent ? slot.textContent + " " : "") + e.description;
      if (input) {
        input.setAttribute("aria-invalid", "true");
        input.setAttribute("aria-describedby", slot.id);
        first = first || input;
      }
      const item = $$("#form-errors li").find((li) => li.dataset.fieldPath === e.field);
      if (item) item.hidden = true;
    });
    if (first) first.focus();
    // "Add row": a copy of the blank row the server rendered last (kept as loaded, so a new row
    // starts blank and with the defaults whatever was typed since), renumbered to the next index.
    $$("[data-add-row]", form).forEach((button) => {
      const fieldset = button.parentElement;
      const rows = () => $$(":scope > .row-group", fieldset);
      const blank = rows()[rows().length - 1].cloneNode(true);
      button.addEventListener("click", () => {
        const last = rows()[rows().length - 1];
        const index = Number(last.dataset.index) + 1;
        const base = fieldset.dataset.repeated;
        const copy = blank.cloneNode(true);
        const from = base + "[" + blank.dataset.index + "]";
        const to = base + "[" + index + "]";
        copy.dataset.index = String(index);
        $$("[name],[id],[for],[data-path],[data-error-for]", copy).forEach((n) => {
          for (const a of ["name", "id", "for", "data-path", "data-error-for"]) {
            const v = n.getAttribute(a);
            if (v && v.startsWith(from)) n.setAttribute(a, to + v.slice(from.length));
          }
        });
        last.after(copy);
        const focus = $("input:not([type=hidden])", copy);
        if (focus) focus.focus();
      });
    });
  }

  // --- workflow page: chart and dead letters ---
  function chart() {
    const fig = $("#chart");
    if (!fig) return;
    const svg = $("svg", fig);
    const points = JSON.parse(fig.dataset.history || "[]"); // [seconds, backlog, records/s]
    const draw = () => {
      const now = Date.now() / 1000;
      const recent = points.filter((p) => p[0] > now - 3600);
      const maxB = Math.max(1, ...recent.map((p) => p[1]));
      const maxR = Math.max(1, ...recent.map((p) => p[2]));
      const x = (t) => ((t - (now - 3600)) / 3600) * 600;
      const line = (i, max) => recent.map((p) => x(p[0]).toFixed(1) + "," + (155 - (p[i] / max) * 145).toFixed(1)).join(" ");
      svg.innerHTML = '<polyline class="line-backlog" fill="none" points="' + line(1, maxB) + '"/>' +
        '<polyline class="line-rps" fill="none" points="' + line(2, maxR) + '"/>';
      $("#chart-range").textContent = "peak backlog " + num(maxB) + ", peak " + num(maxR) + " records/s";
    };
    document.addEventListener("syncplane:row", (ev) => {
      points.push([Date.now() / 1000, ev.detail.backlog, ev.detail.recordsPerSecond]);
      draw();
    });
    draw();
  }

  function deadLetters() {
    const form = $("#dead-letters");
    if (!form) return;
    const id = form.dataset.id;
    const body = $("#dl-rows");
    const more = $("#dl-more");
    let token = "";
    const cell = (text) => { const td = document.createElement("td"); td.textContent = text; return td; };
    async function load(reset) {
      const res = await fetch("/workflows/" + id + "/deadletters" + (token && !reset ? "?page_token=" + encodeURIComponent(token) : ""),
        { headers: { Accept: "application/json" }, credentials: "same-origin" });
      const data = await res.json();
      if (!res.ok) { body.innerHTML = ""; const tr = document.createElement("tr"); const td = cell(data.message);
        td.colSpan = 7; tr.append(td); body.append(tr); return; }
      body.innerHTML = "";
      data.deadLetters.forEach((d) => {
        const tr = document.createElement("tr");
        const box = document.createElement("input");
        box.type = "checkbox"; box.name = "keys"; box.value = d.key;
        box.setAttribute("aria-label", "Select " + d.key);
        const pick = document.createElement("td"); pick.append(box);
        tr.append(pick, cell(d.key), cell(d.stream), cell((d.httpStatus ? d.httpStatus + " " : "") + d.error +
          (d.retryPending ? " (retry pending)" : "")), cell(d.attempts), cell(local(d.firstSeen)), cell(local(d.lastSeen)));
        tr.lastChild.previousSibling.className = tr.lastChild.className = "time";
        body.append(tr);
      });
      if (!data.deadLetters.length) { const tr = document.createElement("tr"); const td = cell("none"); td.colSpan = 7;
        tr.append(td); body.append(tr); }
      $("#dl-total").textContent = data.total + " in all";
      token = data.nextPageToken;
      more.hidden = !token;
    }
    more.addEventListener("click", () => load(false));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const data = new FormData();
      if (ev.submitter && ev.submitter.id !== "dl-retry-all") {
        $$('input[name="keys"]:checked', form).forEach((b) => data.append("keys", b.value));
        if (![...data.keys()].length) { say("Select the dead letters to retry first.", true); return; }
      }
      const { ok, body: out } = await post("/workflows/" + id + "/deadletters/retry", data);
      say(ok ? out.marked + " marked for retry; the workers send them at their next pass." : out.message, !ok);
      load(true);
    });
    let lastCount = null;
    document.addEventListener("syncplane:row", (ev) => {
      if (ev.detail.deadLetters !== lastCount) { lastCount = ev.detail.deadLetters; load(true); }
    });
    load(true);
  }

  function actionForms() {
    $$("form[data-action-form]").forEach((form) => {
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const { ok, body } = await post(form.action, new FormData(form));
        say(ok ? body.message || "Done." : body.message, !ok);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    setInterval(() => $$('time[data-field="age"]').forEach((t) => { t.textContent = age(t.getAttribute("datetime")); }), 1000);
    bindToggles(document);
    live();
    editPage();
    chart();
    deadLetters();
    actionForms();
  });
})();
