// The try-the-model page: an image (a file or a drawing) becomes the model's input on the
// client, is sent to POST /predict, and the answer is drawn as SVG. Plain JavaScript, no
// dependencies; every URL is relative, so the page also works behind a path prefix.
// What the model expects (shape, value range, class names) is read from GET /v1/model.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  // MNIST's convention: the digit's bounding box is scaled to fit 20x20 of the 28x28 image
  // and the digit is placed with its centre of mass at the centre.
  const BOX_FRACTION = 20 / 28;
  const INK_THRESHOLD = 0.1; // of the strongest stroke: what counts as ink when cropping
  const MIN_CONTRAST = 0.05; // below this between ink and background the image is blank
  const MAX_SIDE = 1024; // larger files are scaled down before any processing
  const STROKE_FRACTION = 22 / 280; // pen width relative to the drawing pad
  const DECIMALS = 4; // of each value sent

  const state = {
    model: null, // the answer of GET /v1/model
    layout: null, // {height, width, channels, order} of one input
    range: [0, 1],
    classes: [],
    expectDark: null, // true: light strokes on dark, false: the reverse, null: unknown
    images: { upload: null, draw: null }, // {planes: [r, g, b], width, height}
    sent: null, // the values of the current input, as sent
    shown: null, // [answer, request] on the page, drawn again when the width changes
  };

  // ---------- pixels ----------

  /** RGB planes in [0, 1] of an image or canvas; transparency is flattened onto the
   * background that contrasts with the opaque pixels. */
  function readPixels(source, width, height) {
    const s = Math.min(1, MAX_SIDE / Math.max(width, height));
    const w = Math.max(1, Math.round(width * s));
    const h = Math.max(1, Math.round(height * s));
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(source, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    const n = w * h;
    const planes = [new Float32Array(n), new Float32Array(n), new Float32Array(n)];
    let transparent = false;
    let opaqueLum = 0;
    let opaque = 0;
    for (let i = 0; i < n; i++) {
      const a = data[4 * i + 3] / 255;
      if (a < 1) transparent = true;
      if (a > 0.5) {
        opaqueLum += luminance(data[4 * i], data[4 * i + 1], data[4 * i + 2]) / 255;
        opaque += 1;
      }
    }
    // Dark strokes on a transparent background go on white, light ones on black.
    const bg = transparent && opaque > 0 && opaqueLum / opaque < 0.5 ? 1 : 0;
    for (let i = 0; i < n; i++) {
      const a = transparent ? data[4 * i + 3] / 255 : 1;
      for (let c = 0; c < 3; c++) planes[c][i] = a * (data[4 * i + c] / 255) + (1 - a) * bg;
    }
    return { planes, width: w, height: h };
  }

  function luminance(r, g, b) {
    return 0.299 * r + 0.587 * g + 0.114 * b;
  }

  function grey(img) {
    const [r, g, b] = img.planes;
    const out = new Float32Array(r.length);
    for (let i = 0; i < out.length; i++) out[i] = luminance(r[i], g[i], b[i]);
    return out;
  }

  /** Mean of a plane over its outer ring (4% of the shorter side, at least one pixel). */
  function borderMean(plane, w, h) {
    const ring = Math.max(1, Math.round(0.04 * Math.min(w, h)));
    let sum = 0;
    let n = 0;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (x < ring || y < ring || x >= w - ring || y >= h - ring) {
          sum += plane[y * w + x];
          n += 1;
        }
      }
    }
    return n ? sum / n : 0;
  }

  /** Area-average resampling weights: for each of m outputs, [[input index, weight], ...]. */
  function weights(n, m) {
    const step = n / m;
    const out = [];
    for (let i = 0; i < m; i++) {
      const a = i * step;
      const b = Math.min(n, (i + 1) * step);
      const list = [];
      let total = 0;
      for (let j = Math.floor(a); j < Math.ceil(b); j++) {
        const w = Math.min(b, j + 1) - Math.max(a, j);
        if (w > 0) {
          list.push([j, w]);
          total += w;
        }
      }
      out.push(list.map(([j, w]) => [j, w / total]));
    }
    return out;
  }

  /** The (x0, y0, w, h) window of ``plane`` (row stride ``stride``) resampled to tw x th. */
  function resample(plane, stride, x0, y0, w, h, tw, th) {
    const wx = weights(w, tw);
    const wy = weights(h, th);
    const rows = new Float32Array(h * tw);
    for (let y = 0; y < h; y++) {
      const base = (y0 + y) * stride + x0;
      for (let x = 0; x < tw; x++) {
        let v = 0;
        for (const [j, w] of wx[x]) v += w * plane[base + j];
        rows[y * tw + x] = v;
      }
    }
    const out = new Float32Array(th * tw);
    for (let y = 0; y < th; y++) {
      for (const [j, w] of wy[y]) {
        for (let x = 0; x < tw; x++) out[y * tw + x] += w * rows[j * tw + x];
      }
    }
    return out;
  }

  /** MNIST-style: background to 0, strongest ink to 1, the ink's bounding box scaled into
   * the central box and placed by its centre of mass. */
  function cropAndCentre(plane, w, h, tw, th) {
    const out = new Float32Array(tw * th);
    const bg = borderMean(plane, w, h);
    let max = 0;
    for (const v of plane) max = Math.max(max, v);
    if (max - bg < MIN_CONTRAST) return out;
    const level = new Float32Array(plane.length);
    for (let i = 0; i < plane.length; i++) {
      level[i] = Math.min(1, Math.max(0, (plane[i] - bg) / (max - bg)));
    }
    let [x0, y0, x1, y1] = [w, h, -1, -1];
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (level[y * w + x] > INK_THRESHOLD) {
          x0 = Math.min(x0, x);
          x1 = Math.max(x1, x);
          y0 = Math.min(y0, y);
          y1 = Math.max(y1, y);
        }
      }
    }
    const cw = x1 - x0 + 1;
    const ch = y1 - y0 + 1;
    const scale = (BOX_FRACTION * Math.min(tw, th)) / Math.max(cw, ch);
    const bw = Math.max(1, Math.min(tw, Math.round(cw * scale)));
    const bh = Math.max(1, Math.min(th, Math.round(ch * scale)));
    const patch = resample(level, w, x0, y0, cw, ch, bw, bh);
    let mass = 0;
    let mx = 0;
    let my = 0;
    for (let y = 0; y < bh; y++) {
      for (let x = 0; x < bw; x++) {
        const v = patch[y * bw + x];
        mass += v;
        mx += v * x;
        my += v * y;
      }
    }
    const cx = mass > 0 ? mx / mass : (bw - 1) / 2;
    const cy = mass > 0 ? my / mass : (bh - 1) / 2;
    // MNIST's centres of mass lie at (14, 14) in pixel indices on average: (W / 2, H / 2).
    const ox = clamp(Math.round(tw / 2 - cx), 0, tw - bw);
    const oy = clamp(Math.round(th / 2 - cy), 0, th - bh);
    for (let y = 0; y < bh; y++) {
      for (let x = 0; x < bw; x++) out[(oy + y) * tw + ox + x] = patch[y * bw + x];
    }
    return out;
  }

  /** The whole image, cropped to the input's aspect ratio around its centre, resampled. */
  function cover(plane, w, h, tw, th) {
    let cw = w;
    let ch = h;
    if (w * th > h * tw) cw = Math.max(1, Math.round((h * tw) / th));
    else ch = Math.max(1, Math.round((w * th) / tw));
    return resample(plane, w, Math.floor((w - cw) / 2), Math.floor((h - ch) / 2), cw, ch, tw, th);
  }

  function clamp(v, lo, hi) {
    return Math.min(hi, Math.max(lo, v));
  }

  /** The input as planes in [0, 1] (1: bright), one per channel the model reads. */
  function toInput(img, layout, invert, centre) {
    let planes = layout.channels === 1 ? [grey(img)] : img.planes;
    if (invert) planes = planes.map((p) => p.map((v) => 1 - v));
    const { width: tw, height: th } = layout;
    if (centre && layout.channels === 1) {
      return [cropAndCentre(planes[0], img.width, img.height, tw, th)];
    }
    return planes.map((p) => cover(p, img.width, img.height, tw, th));
  }

  /** Planes in [0, 1] -> the flat list of values sent, in the model's layout and range. */
  function flatten(planes, layout) {
    const [lo, hi] = state.range;
    const n = layout.width * layout.height;
    const out = [];
    const push = (t) => {
      const v = Number((lo + t * (hi - lo)).toFixed(DECIMALS));
      out.push(clamp(v, lo, hi));
    };
    if (layout.order === "hwc") {
      for (let i = 0; i < n; i++) for (const p of planes) push(p[i]);
    } else {
      for (const p of planes) for (let i = 0; i < n; i++) push(p[i]);
    }
    return out;
  }

  /** The model's input as an image: [H, W], [1|3, H, W], [H, W, 1|3] or a square [H*W]. */
  function inputLayout(shape) {
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d > 0)) return null;
    if (shape.length === 2) return { height: shape[0], width: shape[1], channels: 1, order: "hw" };
    if (shape.length === 3 && (shape[0] === 1 || shape[0] === 3)) {
      return { height: shape[1], width: shape[2], channels: shape[0], order: "chw" };
    }
    if (shape.length === 3 && (shape[2] === 1 || shape[2] === 3)) {
      return { height: shape[0], width: shape[1], channels: shape[2], order: "hwc" };
    }
    if (shape.length === 1) {
      const side = Math.round(Math.sqrt(shape[0]));
      if (side > 1 && side * side === shape[0]) {
        return { height: side, width: side, channels: 1, order: "hw" };
      }
    }
    return null;
  }

  // ---------- input ----------

  function mode() {
    return document.querySelector('input[name="source"]:checked').value;
  }

  /** Sets the invert box from the image's background against what the model expects. */
  function autoInvert(img) {
    const hint = $("invert-hint");
    if (state.expectDark === null) {
      hint.textContent = "";
      return;
    }
    const light = borderMean(grey(img), img.width, img.height) > 0.5;
    const invert = light === state.expectDark;
    $("invert").checked = invert;
    const want = state.expectDark ? "light strokes on a dark background" : "dark on light";
    hint.textContent = `${light ? "Light" : "Dark"} background detected: colours ${
      invert ? "inverted" : "kept"
    } (the model expects ${want}).`;
  }

  function updatePreview() {
    const img = state.images[mode()];
    const layout = state.layout;
    const caption = $("preview-caption");
    const preview = $("preview");
    const ctx = preview.getContext("2d");
    if (!layout) return;
    preview.width = layout.width;
    preview.height = layout.height;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, preview.width, preview.height);
    if (!img) {
      state.sent = null;
      caption.textContent = "What is sent: nothing yet.";
      updateSubmit();
      return;
    }
    const planes = toInput(img, layout, $("invert").checked, $("centre").checked);
    state.sent = flatten(planes, layout);
    const pixels = ctx.createImageData(layout.width, layout.height);
    for (let i = 0; i < layout.width * layout.height; i++) {
      for (let c = 0; c < 3; c++) {
        pixels.data[4 * i + c] = Math.round(255 * planes[planes.length === 1 ? 0 : c][i]);
      }
      pixels.data[4 * i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    const [lo, hi] = state.range;
    const kind = layout.channels === 1 ? "grayscale" : "RGB";
    caption.textContent =
      `What is sent, from ${img.name}: ${layout.width}\u00d7${layout.height} ${kind}, ` +
      `${state.sent.length} values in [${lo}, ${hi}], brighter = higher.`;
    updateSubmit();
  }

  function updateSubmit() {
    $("submit").disabled = !(state.model && state.sent);
  }

  function setMode() {
    const draw = mode() === "draw";
    $("draw-box").hidden = !draw;
    $("upload-box").hidden = draw;
    const img = state.images[mode()];
    if (img) autoInvert(img);
    updatePreview();
  }

  function loadFile() {
    const file = $("file").files[0];
    if (!file) return;
    hideError();
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      URL.revokeObjectURL(url);
      state.images.upload = { ...readPixels(img, img.naturalWidth, img.naturalHeight), name: file.name };
      autoInvert(state.images.upload);
      updatePreview();
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      state.images.upload = null;
      updatePreview();
      showError(`${file.name} could not be read as an image (PNG or JPEG expected).`);
    };
    img.src = url;
  }

  function setUpPad() {
    const pad = $("pad");
    const ctx = pad.getContext("2d", { willReadFrequently: true });
    const clear = () => {
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, pad.width, pad.height);
    };
    clear();
    let last = null;
    const at = (e) => {
      const r = pad.getBoundingClientRect();
      return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
    };
    const stroke = (a, b) => {
      ctx.strokeStyle = "#fff";
      ctx.fillStyle = "#fff";
      ctx.lineWidth = STROKE_FRACTION * pad.width;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0], b[1]);
      ctx.stroke();
    };
    pad.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      try {
        pad.setPointerCapture(e.pointerId);
      } catch {
        // a synthetic pointer cannot always be captured; drawing works without it
      }
      last = at(e);
      stroke(last, last);
    });
    pad.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = at(e);
      stroke(last, p);
      last = p;
    });
    const end = () => {
      if (!last) return;
      last = null;
      state.images.draw = { ...readPixels(pad, pad.width, pad.height), name: "the drawing" };
      autoInvert(state.images.draw);
      updatePreview();
    };
    pad.addEventListener("pointerup", end);
    pad.addEventListener("pointercancel", end);
    $("clear").addEventListener("click", () => {
      clear();
      state.images.draw = null;
      updatePreview();
    });
  }

  // ---------- talking to the API ----------

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  /** The message of an error answer: {message, detail: [...]} (docs/api.md), or V2's {error}. */
  function errorText(body) {
    if (!body || typeof body !== "object") return "";
    if (typeof body.message === "string") return body.message;
    if (typeof body.error === "string") return body.error;
    return JSON.stringify(body);
  }

  function integerField(id, name) {
    const el = $(id);
    if (el.validity.badInput) throw new Error(`${name} must be a whole number.`);
    const text = el.value.trim();
    return text === "" ? undefined : Number(text);
  }

  async function submit(event) {
    event.preventDefault();
    if (!state.sent) return;
    hideError();
    let body;
    try {
      body = { inputs: [state.sent] };
      const k = integerField("k", "K");
      const seed = integerField("seed", "The seed");
      if (k !== undefined) body.num_samples = k;
      if (seed !== undefined) body.seed = seed;
    } catch (err) {
      showError(err.message);
      return;
    }
    const result = $("result");
    result.setAttribute("aria-busy", "true");
    result.dataset.state = "pending";
    $("submit").disabled = true;
    try {
      const res = await fetch("predict", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      let answer = null;
      try {
        answer = await res.json();
      } catch {
        answer = null;
      }
      if (!res.ok) {
        showNoResult();
        showError(`The API answered ${res.status}: ${errorText(answer) || res.statusText}`);
        result.dataset.state = "error";
        return;
      }
      render(answer, body);
      result.dataset.state = "done";
    } catch (err) {
      showNoResult();
      showError(`The request failed: ${err.message}`);
      result.dataset.state = "error";
    } finally {
      result.removeAttribute("aria-busy");
      updateSubmit();
    }
  }

  function showNoResult() {
    state.shown = null;
    $("result-body").hidden = true;
    $("result-empty").hidden = false;
    $("result-empty").textContent = "No answer for this request: see the error.";
    $("status").textContent = "";
  }

  // ---------- drawing the answer ----------

  function fmt(x) {
    if (x === 0) return "0";
    return Math.abs(x) >= 0.001 ? x.toFixed(4) : x.toExponential(2);
  }

  function percent(x) {
    return `${(100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 0)}%`;
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  /** The width of a chart in CSS pixels: one SVG unit per pixel keeps text readable. */
  function chartWidth(container) {
    return Math.max(240, Math.round(container.clientWidth)) || 400;
  }

  function chartBox(container, width, height, label) {
    const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
    container.replaceChildren(box);
    return box;
  }

  function shorten(name, chars) {
    return name.length <= chars ? name : `${name.slice(0, Math.max(1, chars - 1))}\u2026`;
  }

  function barChart(probs, names, top) {
    const W = chartWidth($("chart"));
    const H = 190;
    const [padTop, padBottom, side] = [18, 22, 4];
    const slot = (W - 2 * side) / probs.length;
    const plot = H - padTop - padBottom;
    const best = [...probs.keys()].sort((a, b) => probs[b] - probs[a]).slice(0, 3);
    const label =
      "Predictive distribution; highest: " +
      best.map((i) => `${names[i]} ${probs[i].toFixed(3)}`).join(", ");
    const box = chartBox($("chart"), W, H, label);
    box.appendChild(svg("line", { class: "axis", x1: 0, x2: W, y1: H - padBottom, y2: H - padBottom }));
    const chars = Math.max(1, Math.floor(slot / 6.5));
    probs.forEach((p, i) => {
      const h = Math.max(0, p) * plot;
      const x = side + i * slot;
      const bar = svg("rect", {
        class: i === top ? "bar top" : "bar",
        x: x + slot * 0.15,
        y: H - padBottom - h,
        width: slot * 0.7,
        height: h,
        "data-class": names[i],
        "data-probability": p,
      });
      bar.appendChild(svg("title", {}, `${names[i]}: ${p.toFixed(4)}`));
      box.appendChild(bar);
      const mid = x + slot / 2;
      if (slot >= 28 && p >= 0.0005) {
        const y = H - padBottom - h - 4;
        const attrs = { x: mid, y, "text-anchor": "middle", class: "small" };
        box.appendChild(svg("text", attrs, p.toFixed(3)));
      }
      box.appendChild(svg("text", { x: mid, y: H - 6, "text-anchor": "middle" }, shorten(names[i], chars)));
    });
  }

  function probTable(probs, names) {
    const rows = probs.map((p, i) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = names[i];
      const td = document.createElement("td");
      td.textContent = p.toFixed(3);
      tr.append(th, td);
      return tr;
    });
    $("prob-table").tBodies[0].replaceChildren(...rows);
  }

  /** Two bars: the total on its scale (0 to the entropy of the uniform distribution), split
   * into its aleatoric and epistemic parts; and the same split as shares of the total, which
   * stays readable when the total is tiny. */
  function uncertaintyBar(u, classes) {
    const W = chartWidth($("uncertainty"));
    const H = 92;
    const [x0, x1, h] = [4, W - 4, 18];
    const [y1, y2] = [16, 62];
    const span = x1 - x0;
    const max = Math.log(classes); // the entropy of the uniform distribution
    const total = u.predictive_entropy;
    const ale = Math.max(0, u.expected_entropy);
    const epi = Math.max(0, u.mutual_information);
    const share = ale + epi > 0 ? ale / (ale + epi) : null;
    const label =
      `Total uncertainty ${fmt(total)} nats of at most ${max.toFixed(3)}: aleatoric ` +
      `${fmt(u.expected_entropy)} plus epistemic ${fmt(u.mutual_information)}` +
      (share === null ? "" : ` (${percent(share)} and ${percent(1 - share)})`);
    const box = chartBox($("uncertainty"), W, H, label);
    const scale = (v) => (Math.max(0, Math.min(v, max)) / max) * span;
    box.appendChild(svg("text", { x: x0, y: y1 - 4, class: "small" }, "Total, from 0 to the most uncertain"));
    const maxLabel = `ln ${classes} = ${max.toFixed(3)}`;
    box.appendChild(svg("text", { x: x1, y: y1 - 4, "text-anchor": "end", class: "small" }, maxLabel));
    box.appendChild(svg("rect", { class: "track", x: x0, y: y1, width: span, height: h }));
    const wa = scale(ale);
    box.appendChild(svg("rect", { class: "aleatoric", x: x0, y: y1, width: wa, height: h }));
    const we = Math.min(scale(epi), span - wa);
    box.appendChild(svg("rect", { class: "epistemic", x: x0 + wa, y: y1, width: we, height: h }));
    const end = x0 + scale(total);
    box.appendChild(svg("line", { class: "threshold", x1: end, x2: end, y1: y1 - 2, y2: y1 + h + 2 }));
    box.appendChild(svg("text", { x: x0, y: y2 - 4, class: "small" }, "Split of the total"));
    box.appendChild(svg("rect", { class: "track", x: x0, y: y2, width: span, height: h }));
    if (share !== null) {
      const split = share * span;
      box.appendChild(svg("rect", { class: "aleatoric", x: x0, y: y2, width: split, height: h }));
      const rest = { class: "epistemic", x: x0 + split, y: y2, width: span - split, height: h };
      box.appendChild(svg("rect", rest));
      const labels = [
        [share, x0 + 4, "start", `aleatoric ${percent(share)}`],
        [1 - share, x1 - 4, "end", `epistemic ${percent(1 - share)}`],
      ];
      for (const [part, x, anchor, text] of labels) {
        if (part * span > 90) {
          const attrs = { x, y: y2 + 13, "text-anchor": anchor, class: "inside" };
          box.appendChild(svg("text", attrs, text));
        }
      }
    }
    const rows = [
      ["Total (predictive entropy)", u.predictive_entropy, null],
      ["Aleatoric (expected entropy)", ale, "aleatoric"],
      ["Epistemic (mutual information)", epi, "epistemic"],
    ];
    const items = [];
    for (const [name, value, swatch] of rows) {
      const dt = document.createElement("dt");
      if (swatch) {
        const s = document.createElement("span");
        s.className = `swatch ${swatch}`;
        s.setAttribute("aria-hidden", "true");
        dt.appendChild(s);
      }
      dt.appendChild(document.createTextNode(name));
      const dd = document.createElement("dd");
      dd.textContent = fmt(value);
      if (swatch && share !== null) {
        dd.textContent += ` (${percent(swatch === "aleatoric" ? share : 1 - share)})`;
      }
      items.push(dt, dd);
    }
    $("uncertainty-values").replaceChildren(...items);
  }

  function gauge(anomaly) {
    const W = chartWidth($("gauge"));
    const H = 64;
    const [x0, x1, y, h] = [4, W - 4, 20, 16];
    const { score, threshold } = anomaly;
    const max = Math.max(2 * threshold, 1.15 * score, 1e-9);
    const at = (v) => x0 + (Math.max(0, Math.min(v, max)) / max) * (x1 - x0);
    const label = `${anomaly.score_name} ${fmt(score)} against the threshold ${fmt(threshold)}: ${
      anomaly.is_anomaly ? "above, flagged" : "not above, not flagged"
    }`;
    const box = chartBox($("gauge"), W, H, label);
    box.appendChild(svg("rect", { class: "track", x: x0, y, width: x1 - x0, height: h }));
    const t = at(threshold);
    box.appendChild(svg("rect", { class: "over", x: t, y, width: x1 - t, height: h }));
    box.appendChild(svg("line", { class: "threshold", x1: t, x2: t, y1: y - 6, y2: y + h + 2 }));
    const tAttrs = { x: t, y: y - 8, "text-anchor": t > W / 2 ? "end" : "start", class: "small" };
    box.appendChild(svg("text", tAttrs, `threshold ${fmt(threshold)}`));
    const s = at(score);
    box.appendChild(svg("path", { class: "marker", d: `M${s} ${y + h} l-6 10 h12 z` }));
    box.appendChild(svg("rect", { class: "marker", x: s - 1.5, y, width: 3, height: h }));
    const anchor = s < 60 ? "start" : s > W - 60 ? "end" : "middle";
    box.appendChild(svg("text", { x: s, y: H - 2, "text-anchor": anchor }, `score ${fmt(score)}`));
    const info = state.model.anomaly || {};
    const fpr = typeof info.target_fpr === "number" ? `${+(100 * info.target_fpr).toFixed(2)}%` : "a target";
    const on = info.calibration_set ? ` on ${info.calibration_set}` : "";
    $("gauge-text").textContent =
      `${anomaly.score_name} = ${fmt(score)}; flagged above ${fmt(threshold)}, ` +
      `the threshold calibrated for a ${fpr} false-positive rate${on}.`;
  }

  function facts(answer, prediction) {
    const model = answer.model || {};
    const rows = [
      ["Networks averaged (K)", String(answer.num_samples)],
      ["Model variance", fmt(prediction.uncertainty.model_variance)],
      ["Seed", answer.seed == null ? "none (networks drawn from the pool)" : String(answer.seed)],
      ["Model", `${model.id} ${model.version} (sha256 ${String(model.checkpoint_sha256).slice(0, 12)})`],
    ];
    const items = [];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      if (name.startsWith("Networks")) dd.id = "num-samples";
      if (name === "Model variance") dd.id = "model-variance";
      items.push(dt, dd);
    }
    $("facts").replaceChildren(...items);
  }

  function render(answer, body) {
    state.shown = [answer, body];
    $("result-empty").hidden = true;
    $("result-body").hidden = false; // before drawing: the charts take its width
    const prediction = answer.predictions[0];
    const probs = prediction.probabilities;
    const names = probs.map((_, i) => (state.classes.length === probs.length ? state.classes[i] : String(i)));
    const top = prediction.label;
    $("label").textContent = names[top];
    $("label-p").textContent = `with probability ${probs[top].toFixed(3)}`;
    const flag = $("flag");
    const bad = prediction.anomaly.is_anomaly;
    flag.className = `flag ${bad ? "anomalous" : "normal"}`;
    flag.dataset.anomaly = String(bad);
    flag.textContent = bad
      ? "Anomaly: flagged, the score is above its calibrated threshold (unlike the training data)."
      : "Not an anomaly: the score is within its calibrated threshold.";
    $("status").textContent =
      `Predicted ${names[top]} with probability ${probs[top].toFixed(3)}; ` +
      `${bad ? "flagged as an anomaly" : "not an anomaly"}; ${answer.num_samples} networks.`;
    barChart(probs, names, top);
    probTable(probs, names);
    uncertaintyBar(prediction.uncertainty, probs.length);
    gauge(prediction.anomaly);
    facts(answer, prediction);
    $("request-json").textContent = JSON.stringify(body);
  }

  // ---------- start ----------

  /** Class names from the model's metadata where it has them, else the class indices. */
  function classNames(info) {
    if (Array.isArray(info.class_names) && info.class_names.length > 0) return info.class_names.map(String);
    const n = Number.isInteger(info.num_classes) ? info.num_classes : 0;
    return Array.from({ length: n }, (_, i) => String(i));
  }

  /** Whether the model reads light strokes on a dark background, from its input metadata. */
  function polarity(input) {
    if (input.background === "dark") return true;
    if (input.background === "light") return false;
    const text = String(input.description || "").toLowerCase();
    if (/(white|light) (strokes )?on (a )?(black|dark)/.test(text)) return true;
    if (/(black|dark) (strokes )?on (a )?(white|light)/.test(text)) return false;
    return null;
  }

  function init(info) {
    state.model = info;
    const input = info.input || {};
    state.layout = inputLayout(input.shape);
    const range = input.value_range;
    state.range = Array.isArray(range) && range.length === 2 ? range.map(Number) : [0, 1];
    state.classes = classNames(info);
    state.expectDark = polarity(input);
    const k = $("k");
    k.value = info.default_num_samples;
    if (info.limits && info.limits.max_num_samples) k.max = info.limits.max_num_samples;
    const shape = Array.isArray(input.shape) ? input.shape.join("\u00d7") : "?";
    $("model-line").textContent =
      `Model ${info.id} ${info.version}. Input: ${input.description || shape}. ` +
      `${state.classes.length} classes; ${info.default_num_samples} posterior networks by default.`;
    if (!state.layout) {
      const notice = $("unsupported");
      notice.textContent =
        `This model's input (shape ${JSON.stringify(input.shape)}) is not an image, so this ` +
        "page cannot make one; send it to POST /predict as a list of values.";
      notice.hidden = false;
      $("input-controls").hidden = true;
      return;
    }
    $("centre").checked = state.layout.channels === 1;
    updatePreview();
    document.body.dataset.ready = "true";
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function loadModel() {
    for (;;) {
      try {
        const res = await fetch("v1/model", { headers: { Accept: "application/json" } });
        if (res.ok) {
          init(await res.json());
          return;
        }
        let body = null;
        try {
          body = await res.json();
        } catch {
          body = null;
        }
        if (res.status !== 503) {
          $("model-line").textContent = "The model's description could not be loaded.";
          showError(`GET /v1/model answered ${res.status}: ${errorText(body) || res.statusText}`);
          return;
        }
        $("model-line").textContent = "The service is starting; retrying\u2026";
      } catch {
        $("model-line").textContent = "The service cannot be reached; retrying\u2026";
      }
      await sleep(2000);
    }
  }

  for (const radio of document.querySelectorAll('input[name="source"]')) {
    radio.addEventListener("change", setMode);
  }
  $("file").addEventListener("change", loadFile);
  $("invert").addEventListener("change", updatePreview);
  $("centre").addEventListener("change", updatePreview);
  $("predict-form").addEventListener("submit", submit);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => state.shown && !$("result-body").hidden && render(...state.shown), 150);
  });
  setUpPad();
  setMode();
  loadModel();
})();
