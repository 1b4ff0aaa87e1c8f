// The lineage graph as a picture: the ingest subject, Bronze, Silver (and
// its quarantine), each Gold table, and each Gold column with the Silver
// columns it comes from. Laid out in columns left to right, one per stage,
// so the flow reads like the architecture.

import { api } from './api.js';
import { append, clear, h, layerOf, s } from './dom.js';

const CHAR = 7.3; // px per character of the 12px monospace labels
const ROW = 42;
const BOX = 32;
const GAP = 64;

export async function render(page, { match: [, d, p], current }) {
  const g = await api(`/v1/products/${d}/${p}/lineage`);
  if (!current()) return;
  const graph = build(g);
  append(clear(page), 
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/products' }, 'Products'), ' / ',
      h('a', { href: `#/products/${d}/${p}` }, `${d}.${p}`), ' / lineage'),
    h('h1', { tabindex: -1 }, `Lineage of ${d}.${p}`),
    h('p', { class: 'hint' }, 'Boxes are tables (and Gold columns); arrows are the service that writes them. Tab to a table and press Enter to query it.'),
    h('div', { class: 'legend', 'aria-hidden': 'true' },
      ['source', 'bronze', 'silver', 'gold', 'column'].map((l) => h('span', { class: `key ${l}` }, l))),
    h('div', { class: 'graph-wrap' }, draw(graph, `${d}.${p}`)),
    h('details', { class: 'as-text' }, h('summary', {}, 'The same lineage as text'),
      h('ul', {}, graph.edges.map((e) => h('li', {}, `${e.from.id} → ${e.to.id}${e.by ? ` (${e.by})` : ''}`)))));
  performance.mark('lineage-rendered');
}

/// Nodes placed in stage columns, and the edges between them.
export function build(g) {
  const nodes = new Map();
  const node = (id, kind, label, col, extra = {}) => {
    if (!nodes.has(id)) nodes.set(id, { id, kind, label, col, ...extra });
    return nodes.get(id);
  };
  const kindOf = (name) => (name.startsWith('nats:') ? 'source' : layerOf(name));
  const colOf = { source: 0, bronze: 1, silver: 2, gold: 3, column: 4 };
  const edges = [];
  // The colour and the caption say the layer, so the label need not.
  const short = (name) => {
    const kind = kindOf(name);
    if (kind === 'source') return { label: name.replace(/^nats:/, ''), sub: 'NATS subject' };
    const rest = name.slice(kind.length + 1);
    return { label: rest, sub: name.endsWith('__quarantine') ? `${kind} · quarantine` : kind };
  };
  const place = (name) => {
    const { label, sub } = short(name);
    return node(name, kindOf(name), label, colOf[kindOf(name)], { sub });
  };
  for (const e of g.edges) {
    const from = place(e.from);
    const to = place(e.to);
    edges.push({ from, to, by: e.by, sql: e.sql });
  }
  for (const c of g.columns) {
    const table = place(c.table);
    const srcs = c.sources.map((x) => x.split('.').pop());
    const how = `← ${srcs.join(', ') || 'no column'}${c.transformation ? ` · ${c.transformation}` : ''}`;
    const col = node(`${c.table}.${c.column}`, 'column', c.column, 4, {
      sub: how.length > 44 ? `${how.slice(0, 43)}…` : how,
      full: how,
    });
    edges.push({ from: table, to: col, by: null, column: true });
  }
  return { nodes: [...nodes.values()], edges };
}

function draw(graph, product) {
  const cols = [0, 1, 2, 3, 4].map((c) => graph.nodes.filter((n) => n.col === c));
  const widths = cols.map((ns) => Math.max(0, ...ns.map((n) => Math.max(n.label.length, (n.sub || '').length * 0.85) * CHAR + 24)));
  const xs = [];
  let x = 10;
  for (const w of widths) {
    xs.push(x);
    x += w ? w + GAP : 0;
  }
  const tallest = Math.max(...cols.map((ns) => ns.length));
  const height = Math.max(1, tallest) * ROW + 20;
  cols.forEach((ns, c) => {
    const top = 10 + ((tallest - ns.length) * ROW) / 2;
    ns.forEach((n, i) => Object.assign(n, { x: xs[c], y: top + i * ROW, w: widths[c] }));
  });
  const width = x - GAP + 10;
  const marker = s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }));
  return s('svg', {
    class: 'lineage', width, height, viewBox: `0 0 ${width} ${height}`,
    role: 'group', 'aria-labelledby': 'lineage-title',
  },
  s('title', { id: 'lineage-title' }, `Lineage graph of ${product}: ${graph.nodes.length} nodes, ${graph.edges.length} edges`),
  s('defs', {}, marker),
  s('g', { class: 'edges' }, graph.edges.map(edge)),
  s('g', { class: 'nodes' }, graph.nodes.map(box)));
}

function edge(e) {
  const x1 = e.from.x + e.from.w;
  const y1 = e.from.y + BOX / 2;
  const x2 = e.to.x;
  const y2 = e.to.y + BOX / 2;
  const mid = (x1 + x2) / 2;
  return s('path', {
    class: e.column ? 'edge column' : 'edge',
    d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 1},${y2}`,
    'marker-end': 'url(#arrow)',
  }, s('title', {}, `${e.from.label} → ${e.to.label}${e.by ? ` by ${e.by}` : ''}${e.sql ? `\n${e.sql}` : ''}`));
}

function box(n) {
  const queryable = ['bronze', 'silver', 'gold'].includes(n.kind);
  const go = () => {
    location.hash = `#/sql?q=${encodeURIComponent(`SELECT * FROM ${n.id} LIMIT 100`)}`;
  };
  const g = s('g', {
    class: `node ${n.kind}${n.id.endsWith('__quarantine') ? ' quarantine' : ''}`,
    'data-layer': n.kind, 'data-id': n.id,
    transform: `translate(${n.x},${n.y})`,
    tabindex: queryable ? 0 : null,
    role: queryable ? 'link' : 'img',
    'aria-label': queryable ? `${n.kind} table ${n.id}: query it` : `${n.kind} ${n.label} ${n.full || n.sub || ''}`,
  },
  s('title', {}, n.full ? `${n.id} ${n.full}` : n.id),
  s('rect', { width: n.w, height: BOX, rx: 5 }),
  s('text', { x: 10, y: n.sub ? 14 : 20, class: 'label' }, n.label),
  n.sub ? s('text', { x: 10, y: 27, class: 'sub' }, n.sub) : null);
  if (queryable) {
    g.addEventListener('click', go);
    g.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        go();
      }
    });
  }
  return g;
}
