// The explorer: plain JavaScript over plotly.js. Every id and attribute goes into the page as text
// (textContent, createElement), never as HTML. "live": asks `gallery serve`; "static": everything is in DATA.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  const live = DATA.mode === "live";
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#ad494a", "#8ca252", "#bd9e39", "#7b4173", "#3182bd"];
  const MISSING = "#d0d4d9";
  const NAMES = {float: "float (exact cosine)", code: "code (Hamming, then cosine)"};
  const state = {selected: null, colourBy: ""};

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function getJSON(url, init) {
    const response = await fetch(url, init);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
      throw new Error(`${response.status}: ${detail}`);
    }
    return body;
  }

  const k = () => Math.max(1, Math.min(50, parseInt($("k").value, 10) || DATA.k));
  const q = encodeURIComponent;

  // Where answers come from: the service, or what the export holds.
  const source = live ? {
    photo: (id, index, size) => `api/photo?id=${q(id)}&index=${index}&size=${size}`,
    gallery: async (id) => {
      const shown = await getJSON(`api/gallery?id=${q(id)}`);
      shown.photoUrls = Array.from({length: Math.min(shown.photos, 12)}, (_, i) => source.photo(id, i, 192));
      return shown;
    },
    neighbours: (id, count) => getJSON(`api/neighbours?id=${q(id)}&k=${count}&search=${DATA.searches.length > 1 ? "both" : DATA.searches[0]}`),
  } : {
    photo: (id) => (DATA.details[id] && DATA.details[id].photo_data[0]) || null,
    gallery: async (id) => {
      const shown = DATA.details[id];
      if (!shown) throw new Error(`gallery "${id}" is not in this export (it holds the ${DATA.map.ids.length} galleries on the map)`);
      return Object.assign({}, shown, {photoUrls: shown.photo_data.filter(Boolean)});
    },
    neighbours: async (id, count) => {
      const shown = DATA.details[id];
      return {results: Object.entries(shown.neighbours).map(([search, r]) => ({
        search, score: r.score,
        hits: r.hits.slice(0, count).map(([gallery_id, score, relevant], i) => ({rank: i + 1, gallery_id, score, relevant}))}))};
    },
  };

  // ---------------------------------------------------------------- the map

  function trace(indexes, name, marker) {
    const m = DATA.map;
    return {type: "scatter", mode: "markers", name, hoverinfo: "none",
            x: indexes.map((i) => m.x[i]), y: indexes.map((i) => m.y[i]), customdata: indexes.map((i) => m.ids[i]),
            marker: Object.assign({size: 8, line: {width: 0.5, color: "#ffffff"}}, marker)};
  }

  function traces() {
    const all = DATA.map.ids.map((_, i) => i);
    const attribute = DATA.attributes.find((a) => a.name === state.colourBy);
    if (!attribute) return [trace(all, "galleries", {color: PALETTE[0]})];
    const values = DATA.colours[attribute.name];
    const missing = all.filter((i) => values[i] === null);
    const out = [];
    if (attribute.numeric) {
      const present = all.filter((i) => values[i] !== null);
      out.push(trace(present, attribute.name, {color: present.map((i) => values[i]), colorscale: "Viridis", showscale: true,
                                               colorbar: {title: {text: attribute.name}, thickness: 12}}));
    } else {
      attribute.values.forEach((value, n) => {
        const members = all.filter((i) => values[i] === value);
        if (members.length) out.push(trace(members, value, {color: PALETTE[n % PALETTE.length]}));
      });
    }
    if (missing.length) out.push(trace(missing, "missing", {color: MISSING}));
    return out;
  }

  function selection() {
    const i = DATA.map.ids.indexOf(state.selected);
    if (i < 0) return [];
    return [{type: "scatter", mode: "markers", name: "selected", hoverinfo: "skip", showlegend: false,
             x: [DATA.map.x[i]], y: [DATA.map.y[i]], marker: {size: 18, color: "rgba(0,0,0,0)", line: {width: 3, color: "#111"}}}];
  }

  function drawMap() {
    const layout = {margin: {l: 10, r: 10, t: 30, b: 10}, hovermode: "closest", dragmode: "pan",
                    title: {text: state.colourBy ? `coloured by ${state.colourBy}` : "", font: {size: 13}},
                    xaxis: {visible: false}, yaxis: {visible: false}, legend: {itemsizing: "constant"}};
    return Plotly.react("map", traces().concat(selection()), layout, {displaylogo: false, responsive: true, scrollZoom: true});
  }

  function showHover(event) {
    const point = event.points && event.points[0];
    if (!point || point.customdata === undefined) return;
    const id = point.customdata, box = $("hover"), url = source.photo(id, 0, 192);
    $("hover-id").textContent = id;
    const img = $("hover-img");
    if (url) { img.src = url; img.hidden = false; } else { img.removeAttribute("src"); img.hidden = true; }
    box.style.left = `${event.event.clientX + 16}px`;
    box.style.top = `${event.event.clientY + 16}px`;
    box.hidden = false;
  }

  // ---------------------------------------------------------------- a gallery and its neighbours

  function thumbnail(id) {
    const url = source.photo(id, 0, 96);
    return url ? el("img", {src: url, alt: "", loading: "lazy"}) : el("span");
  }

  function rankingLists(results) {
    const idsOf = (r) => new Set(r.hits.map((h) => h.gallery_id));
    const sets = results.map(idsOf);
    const lists = results.map((r, n) => {
      const others = sets.filter((_, m) => m !== n);
      const items = r.hits.map((h) => {
        const differs = others.some((s) => !s.has(h.gallery_id));
        const score = r.score === "cosine" ? h.score.toFixed(3) : `${h.score} bits`;
        const relevant = h.relevant || [];  // the catalogue's metric tasks by which it belongs with the query
        const title = [differs ? `not among the other search's top ${r.hits.length}` : "",
                       relevant.length ? `relevant by ${relevant.join(", ")}` : ""].filter(Boolean).join("; ");
        return el("li", {class: [differs ? "differs" : "", relevant.length ? "relevant" : ""].join(" ").trim(),
                         "data-gallery-id": h.gallery_id, title},
                  el("span", {}, h.rank), thumbnail(h.gallery_id),
                  el("span", {}, el("button", {class: "id", type: "button", onclick: () => select(h.gallery_id)}, h.gallery_id),
                     ...relevant.map((task) => el("span", {class: "relevant-mark"}, task))),
                  el("span", {class: "score"}, score));
      });
      return el("div", {class: "ranking", "data-search": r.search},
                el("h3", {}, `${NAMES[r.search] || r.search}, ${r.score}`), el("ol", {}, ...items));
    });
    const parts = [el("div", {class: "rankings"}, ...lists)];
    if (results.length === 2) {
      const differ = results[0].hits.filter((h) => !sets[1].has(h.gallery_id)).length;
      parts.unshift(el("p", {class: "summary"},
        `${differ} of ${results[0].hits.length} neighbours differ between float and code search (highlighted).`));
    }
    return parts;
  }

  async function select(id) {
    state.selected = id;
    $("search-id").value = id;
    const panel = $("detail");
    panel.replaceChildren(el("p", {class: "hint"}, "loading…"));
    drawMap();
    try {
      const [shown, found] = await Promise.all([source.gallery(id), source.neighbours(id, k())]);
      const attributes = Object.entries(shown.attributes || {}).map(([name, value]) =>
        el("tr", {}, el("td", {}, name), el("td", {}, value === null ? "—" : value)));
      panel.replaceChildren(
        el("h2", {id: "gallery-id"}, shown.gallery_id),
        el("p", {class: "hint"}, `${shown.split} split · ${shown.photos} photo(s)`),
        el("div", {class: "photos"}, ...shown.photoUrls.map((url) => el("img", {src: url, alt: ""}))),
        el("details", {id: "attributes"}, el("summary", {}, `${attributes.length} attributes`),
           el("table", {class: "attributes"}, el("tbody", {}, ...attributes))),
        el("h3", {}, `${found.results[0].hits.length} nearest galleries`),
        ...rankingLists(found.results));
    } catch (error) {
      panel.replaceChildren(el("p", {class: "error"}, error.message));
    }
  }

  // ---------------------------------------------------------------- seed photos

  async function searchPhotos(files) {
    files = Array.from(files).filter((f) => f.type.startsWith("image/") || f.type === "");
    const out = $("seed-results");
    if (!files.length) return;
    $("seed-photos").replaceChildren(...files.map((f) => el("img", {src: URL.createObjectURL(f), alt: f.name})));
    out.replaceChildren(el("p", {class: "hint"}, `searching with ${files.length} photo(s)…`));
    const form = new FormData();
    files.forEach((f) => form.append("photos", f, f.name));
    form.append("k", String(k()));
    form.append("search", DATA.searches.length > 1 ? "both" : DATA.searches[0]);
    try {
      const found = await getJSON("api/search/photos", {method: "POST", body: form});
      out.replaceChildren(el("div", {class: "rankings-box"},
        el("h3", {}, `galleries most like the ${found.photos} seed photo(s)`), ...rankingLists(found.results)));
    } catch (error) {
      out.replaceChildren(el("p", {class: "error"}, error.message));
    }
  }

  function setUpDrop() {
    const drop = $("drop");
    if (!live || !DATA.seed_photos) {
      drop.classList.add("disabled");
      $("drop-label").textContent = live
        ? "This server has no model to embed seed photos with (start it with --run)."
        : `Seed-photo search needs the live service: gallery serve --run ${DATA.run_id || "RUN"}`;
      return;
    }
    const input = $("seed-input");
    drop.addEventListener("click", () => input.click());
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
    input.addEventListener("change", () => searchPhotos(input.files));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); searchPhotos(e.dataTransfer.files); });
  }

  // ---------------------------------------------------------------- start

  $("run").textContent = `run ${DATA.run_id || "?"} · ${DATA.galleries} galleries` +
    (DATA.map.ids.length < DATA.galleries ? ` (${DATA.map.ids.length} on the map)` : "") + ` · code ${DATA.code}`;
  $("k").value = DATA.k;
  const colourBy = $("colour-by");
  colourBy.append(el("option", {value: ""}, "nothing"),
                  ...DATA.attributes.map((a) => el("option", {value: a.name}, `${a.name} (${a.role})`)));
  state.colourBy = DATA.colour_by || "";
  colourBy.value = state.colourBy;
  colourBy.addEventListener("change", () => { state.colourBy = colourBy.value; drawMap(); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); const id = $("search-id").value.trim(); if (id) select(id); });
  setUpDrop();
  drawMap().then(() => {
    const map = $("map");
    map.on("plotly_click", (e) => { if (e.points[0] && e.points[0].customdata !== undefined) select(e.points[0].customdata); });
    map.on("plotly_hover", showHover);
    map.on("plotly_unhover", () => { $("hover").hidden = true; });
    map.dataset.ready = "true";
  });
})();
