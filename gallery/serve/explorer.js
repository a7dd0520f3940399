// The explorer: plain JavaScript over plotly.js. Every id and attribute goes into the page as text
// (textContent, createElement), never as HTML. "live": asks `gallery serve`; "static": everything is in DATA.
// With DATA.compare, the compare view: A's map and B's side by side, one order of galleries, linked.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  const live = DATA.mode === "live";
  const compare = DATA.compare || null;
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#ad494a", "#8ca252", "#bd9e39", "#7b4173", "#3182bd"];
  const MISSING = "#d0d4d9";
  const NAMES = {float: "float (exact cosine)", code: "code (Hamming, then cosine)"};
  // revision: a map's selectionrevision, moved on when a selection is made on another map, so that its redraw
  // shows that selection instead of keeping the one made on it before
  const VIEWS = [{div: "map", side: "A", x: DATA.map.x, y: DATA.map.y, revision: 0}]
    .concat(compare ? [{div: "map-b", side: "B", x: compare.map_b.x, y: compare.map_b.y, revision: 0}] : []);
  // hovered: {id, on: the map's div}, ringed on the other map; chosen: the ids of a lasso or box selection
  const state = {selected: null, colourBy: "", hovered: null, chosen: null};

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
    compare: (id) => getJSON(`api/compare?id=${q(id)}`),
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
    compare: async (id) => DATA.details[id].compare,
  };

  // ---------------------------------------------------------------- the map

  function trace(view, indexes, name, marker, extra) {
    const ids = DATA.map.ids;
    return Object.assign({type: "scatter", mode: "markers", name, hoverinfo: "none",
            x: indexes.map((i) => view.x[i]), y: indexes.map((i) => view.y[i]), customdata: indexes.map((i) => ids[i]),
            marker: Object.assign({size: 8, line: {width: 0.5, color: "#ffffff"}}, marker),
            // a selection made on either map shows on both: the galleries outside it dimmed
            selectedpoints: state.chosen ? indexes.flatMap((i, n) => (state.chosen.has(ids[i]) ? [n] : [])) : null}, extra);
  }

  function traces(view) {
    const all = DATA.map.ids.map((_, i) => i);
    const attribute = DATA.attributes.find((a) => a.name === state.colourBy);
    if (!attribute) return [trace(view, all, "galleries", {color: PALETTE[0]})];
    const values = DATA.colours[attribute.name];
    const missing = all.filter((i) => values[i] === null);
    const out = [];
    if (attribute.numeric) {
      const present = all.filter((i) => values[i] !== null);
      const range = attribute.range ? {cmin: attribute.range[0], cmax: attribute.range[1]} : {};
      // the bar fills the lower three quarters, its title along its side: the legend (top right) never covers it
      out.push(trace(view, present, attribute.name, Object.assign({color: present.map((i) => values[i]), colorscale: "Viridis",
        showscale: true, colorbar: {title: {text: attribute.name, side: "right"}, thickness: 12, len: 0.75, y: 0, yanchor: "bottom"}},
        range), {showlegend: false}));
    } else {
      attribute.values.forEach((value, n) => {
        const members = all.filter((i) => values[i] === value);
        if (members.length) out.push(trace(view, members, value, {color: PALETTE[n % PALETTE.length]}));
      });
    }
    if (missing.length) out.push(trace(view, missing, "missing", {color: MISSING}));
    return out;
  }

  function ring(view, id, name, colour) {
    const i = DATA.map.ids.indexOf(id);
    if (i < 0) return [];
    return [{type: "scatter", mode: "markers", name, hoverinfo: "skip", showlegend: false, customdata: [id],
             x: [view.x[i]], y: [view.y[i]], marker: {size: 18, color: "rgba(0,0,0,0)", line: {width: 3, color: colour}},
             unselected: {marker: {opacity: 1}}}];  // a ring stays clear when a selection dims the points
  }

  function drawMap(view) {
    const title = state.colourBy && !compare ? `coloured by ${state.colourBy}` : "";  // compared maps: the caption names each
    // uirevision: a redraw keeps the user's zoom and drag mode (pan, box or lasso select)
    const layout = {margin: {l: 10, r: 10, t: 30, b: 10}, hovermode: "closest", dragmode: "pan", uirevision: "keep",
                    selectionrevision: view.revision,
                    title: {text: title, font: {size: 13}}, xaxis: {visible: false}, yaxis: {visible: false},
                    legend: {itemsizing: "constant", y: 1, yanchor: "top"}};
    const hovered = state.hovered && state.hovered.on !== view.div ? ring(view, state.hovered.id, "hovered", "#d62728") : [];
    view.drawing = true;  // a redraw re-applies the map's own selection, and says so: not the user's doing
    return Plotly.react(view.div, traces(view).concat(ring(view, state.selected, "selected", "#111"), hovered), layout,
                        {displaylogo: false, responsive: true, scrollZoom: true}).finally(() => { view.drawing = false; });
  }

  const drawMaps = () => Promise.all(VIEWS.map(drawMap));
  const drawOthers = (view) => Promise.all(VIEWS.filter((v) => v !== view).map(drawMap));

  function showHover(event, view) {
    const point = event.points && event.points[0];
    if (!point || point.customdata === undefined) return;
    const id = point.customdata, box = $("hover"), url = source.photo(id, 0, 192);
    $("hover-id").textContent = id;
    const img = $("hover-img");
    if (url) { img.src = url; img.hidden = false; } else { img.removeAttribute("src"); img.hidden = true; }
    box.style.left = `${event.event.clientX + 16}px`;
    box.style.top = `${event.event.clientY + 16}px`;
    box.hidden = false;
    state.hovered = {id, on: view.div};
    drawOthers(view);
  }

  function hideHover(view) {
    $("hover").hidden = true;
    state.hovered = null;
    drawOthers(view);
  }

  // ---------------------------------------------------------------- a lasso or box selection

  const chosenIds = () => (state.chosen ? DATA.map.ids.filter((id) => state.chosen.has(id)) : []);

  function choose(event, view) {
    if (view.drawing) return;
    const ids = new Set(((event && event.points) || []).map((p) => p.customdata).filter((id) => id !== undefined));
    state.chosen = ids.size ? ids : null;
    VIEWS.forEach((v) => { if (v !== view) v.revision += 1; });
    listChosen();
    return drawOthers(view);
  }

  function listChosen() {
    const listed = chosenIds();
    $("chosen-count").textContent = listed.length ? `${listed.length} galleries selected`
      : "Select galleries with the box or lasso of the map's mode bar to list them and export their ids.";
    $("chosen-csv").hidden = !listed.length;
    $("chosen-ids").replaceChildren(...listed.map((id) => el("li", {}, el("button", {class: "id", type: "button", onclick: () => select(id)}, id))));
  }

  // RFC 4180: a field holding a comma, a quote or a line break is quoted, its quotes doubled
  const csvField = (text) => (/[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text);

  function exportChosen() {
    const csv = ["gallery_id"].concat(chosenIds()).map(csvField).join("\r\n") + "\r\n";
    const url = URL.createObjectURL(new Blob([csv], {type: "text/csv"}));
    const link = el("a", {href: url, download: "selected-galleries.csv"});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---------------------------------------------------------------- a gallery and its neighbours

  function thumbnail(id) {
    const url = source.photo(id, 0, 96);
    return url ? el("img", {src: url, alt: "", loading: "lazy"}) : el("span");
  }

  // Rankings side by side; a gallery only one of them holds is highlighted, and marked with the side it is
  // on when the rankings are A's and B's (r.side). `summary` replaces the float-and-code one.
  function rankingLists(results, summary) {
    const idsOf = (r) => new Set(r.hits.map((h) => h.gallery_id));
    const sets = results.map(idsOf);
    const lists = results.map((r, n) => {
      const others = sets.filter((_, m) => m !== n);
      const items = r.hits.map((h) => {
        const differs = others.some((s) => !s.has(h.gallery_id));
        const score = h.score === undefined ? "" : r.score === "cosine" ? h.score.toFixed(3) : `${h.score} bits`;
        const relevant = h.relevant || [];  // the catalogue's metric tasks by which it belongs with the query
        const change = r.side ? el("span", {class: "change-mark"}, differs ? `only in ${r.side}` : "in both") : null;
        const title = [differs ? `not in the other list's top ${r.hits.length}` : "",
                       relevant.length ? `relevant by ${relevant.join(", ")}` : ""].filter(Boolean).join("; ");
        return el("li", {class: [differs ? "differs" : "", relevant.length ? "relevant" : ""].join(" ").trim(),
                         "data-gallery-id": h.gallery_id, title},
                  el("span", {}, h.rank), thumbnail(h.gallery_id),
                  el("span", {}, el("button", {class: "id", type: "button", onclick: () => select(h.gallery_id)}, h.gallery_id),
                     change, ...relevant.map((task) => el("span", {class: "relevant-mark"}, task))),
                  el("span", {class: "score"}, score));
      });
      return el("div", {class: "ranking", "data-search": r.search},
                el("h3", {}, r.title || `${NAMES[r.search] || r.search}, ${r.score}`), el("ol", {}, ...items));
    });
    const parts = [el("div", {class: "rankings"}, ...lists)];
    if (results.length === 2) {
      const differ = results[0].hits.filter((h) => !sets[1].has(h.gallery_id)).length;
      parts.unshift(el("p", {class: "summary"},
        summary || `${differ} of ${results[0].hits.length} neighbours differ between float and code search (highlighted).`));
    }
    return parts;
  }

  function neighbourLists(found) {
    return [el("h3", {}, `${found.results[0].hits.length} nearest galleries`), ...rankingLists(found.results)];
  }

  // A's top k beside B's: what changed when B replaced A
  function comparedLists(found) {
    const ranking = (side, ids, other) => ({search: side.toLowerCase(), side, hits: ids.map((gallery_id, i) => ({rank: i + 1, gallery_id})),
      title: `${side}: run ${other.run_id || "?"}`});
    const kept = found.a.filter((id) => found.b.includes(id)).length;
    return [el("h3", {}, `top ${found.k} neighbours under A and under B`),
            ...rankingLists([ranking("A", found.a, compare.a), ranking("B", found.b, compare.b)],
              `neighbour overlap ${found.overlap.toFixed(2)}: ${kept} of ${found.k} in both top ${found.k}; ` +
              `${found.a.length - kept} only in A's, ${found.b.length - kept} only in B's (highlighted).`)];
  }

  async function select(id) {
    state.selected = id;
    $("search-id").value = id;
    const panel = $("detail");
    panel.replaceChildren(el("p", {class: "hint"}, "loading…"));
    drawMaps();
    try {
      const [shown, found] = await Promise.all([source.gallery(id), compare ? source.compare(id) : source.neighbours(id, k())]);
      const attributes = Object.entries(shown.attributes || {}).map(([name, value]) =>
        el("tr", {}, el("td", {}, name), el("td", {}, value === null ? "—" : value)));
      panel.replaceChildren(
        el("h2", {id: "gallery-id"}, shown.gallery_id),
        el("p", {class: "hint"}, `${shown.split} split · ${shown.photos} photo(s)`),
        el("div", {class: "photos"}, ...shown.photoUrls.map((url) => el("img", {src: url, alt: ""}))),
        el("details", {id: "attributes"}, el("summary", {}, `${attributes.length} attributes`),
           el("table", {class: "attributes"}, el("tbody", {}, ...attributes))),
        ...(compare ? comparedLists(found) : neighbourLists(found)));
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

  const onMap = DATA.map.ids.length < (compare ? compare.shared : DATA.galleries) ? ` (${DATA.map.ids.length} on the map)` : "";
  $("run").textContent = compare
    ? `A against B · ${compare.shared} galleries in both${onMap} · top ${compare.k} neighbours compared`
    : `run ${DATA.run_id || "?"} · ${DATA.galleries} galleries${onMap} · code ${DATA.code}`;
  $("k").value = DATA.k;
  const colourBy = $("colour-by");
  colourBy.append(el("option", {value: ""}, "nothing"), ...DATA.attributes.map((a) =>
    el("option", {value: a.name}, a.role === "compare" ? a.name : `${a.name} (${a.role})`)));
  state.colourBy = DATA.colour_by || "";
  colourBy.value = state.colourBy;
  colourBy.addEventListener("change", () => { state.colourBy = colourBy.value; drawMaps(); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); const id = $("search-id").value.trim(); if (id) select(id); });
  $("chosen-csv").addEventListener("click", exportChosen);
  if (compare) {  // the lists are the comparison's top k, and seed photos would search A alone: neither is asked for
    document.body.classList.add("compare");
    $("k").parentElement.hidden = true;
    $("drop").hidden = true;
    $("side-b").hidden = $("caption-a").hidden = false;
    for (const [side, shown] of [["a", compare.a], ["b", compare.b]]) {
      const caption = $(`caption-${side}`);
      caption.textContent = `${side.toUpperCase()}: run ${shown.run_id || "?"} · ${shown.location}`;
      caption.title = shown.location;
    }
    if (compare.shared < compare.a.galleries || compare.shared < compare.b.galleries) {
      $("shared-note").hidden = false;
      $("shared-note").textContent = `A holds ${compare.a.galleries} galleries and B ${compare.b.galleries}: both maps and ` +
        `all neighbours are over the ${compare.shared} galleries both hold.`;
    }
  } else {
    setUpDrop();
  }
  listChosen();
  drawMaps().then(() => {
    for (const view of VIEWS) {
      const map = $(view.div);
      map.on("plotly_click", (e) => { if (e.points[0] && e.points[0].customdata !== undefined) select(e.points[0].customdata); });
      map.on("plotly_hover", (e) => showHover(e, view));
      map.on("plotly_unhover", () => hideHover(view));
      map.on("plotly_selected", (e) => choose(e, view));
      map.on("plotly_deselect", () => choose(null, view));
    }
    $("map").dataset.ready = "true";
  });
})();
