// One product: what it is, whether to trust it (contract, freshness,
// quality, history) and where its tables are.

import { api, explain } from './api.js';
import { ago, append, clear, h, layerOf, s as svg, table } from './dom.js';
import { grid } from './sql.js';

export async function render(page, { match: [, d, p], current }) {
  const prod = await api(`/v1/products/${d}/${p}`);
  if (!current()) return;
  const spec = prod.spec?.spec || {};
  const readable = prod.tables.filter((t) => t.exists);
  const first = readable.find((t) => layerOf(t.name) === 'gold') || readable[0];
  append(clear(page), 
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/products' }, 'Products'), ' / ', `${d}.${p}`),
    h('h1', { tabindex: -1 }, `${d}.${p}`),
    h('p', { class: 'lead' }, prod.description || 'No description.'),
    h('dl', { class: 'facts' },
      fact('Owner', prod.owner || '—'),
      fact('Tags', prod.tags.length ? prod.tags.map((t) => h('a', { class: 'tag', href: `#/products?tag=${encodeURIComponent(t)}` }, t)) : '—'),
      fact('Revision', prod.revision ?? '—'),
      fact('Defined by', prod.managed_by || 'the API (PUT /v1/products)'),
      fact('Freshness SLA', spec.sla?.freshness || 'none'),
      spec.cdc ? fact('Change feed', changeFeed(spec.cdc)) : null),
    h('p', { class: 'actions' },
      h('a', { class: 'button', href: `#/lineage/${d}/${p}` }, 'Lineage graph'),
      h('a', { class: 'button', href: `#/quarantine/${d}/${p}` }, 'Quarantined rows'),
      first ? h('a', { class: 'button', href: `#/sql?q=${encodeURIComponent(`SELECT * FROM ${first.name} LIMIT 100`)}` }, 'Query in SQL') : null),
    section('Tables you may read', tables(prod.tables)),
    section('Contract', contract(spec)),
    section('Quality', quality(prod.quality, prod.dead_letters)),
    spec.gold?.length ? section('Gold definitions', spec.gold.map((g) => h('div', { class: 'gold-def' },
      h('h3', {}, `gold.${d}.${g.name}`), h('pre', { class: 'code' }, g.sql.trim())))) : null,
    section('Revisions', h('div', { id: 'revisions' }, h('p', { class: 'loading' }, 'Loading revisions…'))));
  await revisions(page.querySelector('#revisions'), d, p);
}

const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v)];

/// `spec.cdc` in words: what the feed is and what Silver keeps of it.
function changeFeed(cdc) {
  const seq = [].concat(cdc.sequence_by).join(', ');
  const kept = (cdc.stored_as || 'scd1') === 'scd2'
    ? 'SCD2: every version, with __start_at / __end_at'
    : 'SCD1: the latest row per key';
  return `${cdc.format} — ${kept}; ordered by ${seq}`;
}

function section(title, ...body) {
  const id = `s-${title.toLowerCase().replace(/[^a-z]+/g, '-')}`;
  return h('section', { 'aria-labelledby': id }, h('h2', { id }, title), body);
}

function tables(list) {
  if (!list.length) return h('p', { class: 'empty' }, 'Your roles are granted no table of this product.');
  return ['bronze', 'silver', 'gold'].map((layer) => {
    const mine = list.filter((t) => layerOf(t.name) === layer);
    if (!mine.length) return null;
    return h('div', { class: `layer-block ${layer}` },
      h('h3', {}, layer[0].toUpperCase() + layer.slice(1)),
      table(['Table', 'Delta version', 'Rows', 'Last data commit', 'Lag', 'Freshness', 'Schema', 'History'],
        mine.map((t) => [
          h('code', {}, t.name),
          t.exists ? String(t.version) : 'not written yet',
          t.exists ? t.rows.toLocaleString() : '—',
          t.last_commit ? new Date(t.last_commit).toLocaleString() : '—',
          ago(t.age_seconds),
          t.freshness ? h('span', { class: `badge ${t.freshness}` }, t.freshness) : '—',
          t.schema?.length ? h('details', {}, h('summary', {}, `${t.schema.length} columns`),
            h('ul', { class: 'cols' }, t.schema.map((c) => h('li', {}, h('code', {}, c.name), ` ${c.type}${c.nullable ? '' : ' not null'}`)))) : '—',
          t.exists ? history(t.name) : '—',
        ]), { class: 'tables' }));
  });
}

/// A table's recent commits, fetched when opened (one call per table).
function history(name) {
  const [layer, domain, tbl] = name.split('.');
  const box = h('div', { class: 'history', 'aria-live': 'polite' });
  const details = h('details', { 'data-history': name }, h('summary', {}, 'commits'), box);
  details.addEventListener('toggle', async () => {
    if (!details.open || box.dataset.loaded) return;
    box.dataset.loaded = '1';
    append(box, h('p', { class: 'loading' }, 'Loading…'));
    try {
      const info = await api(`/v1/tables/${layer}/${domain}/${tbl}`);
      append(clear(box), table(['Version', 'When', 'Operation', 'Rows added', 'Files +/−'],
        (info.history || []).map((e) => [
          String(e.version),
          e.at ? new Date(e.at).toLocaleString() : '—',
          e.maintenance ? `${e.operation || ''} (maintenance: ${e.maintenance})` : e.operation || '—',
          e.rows_added.toLocaleString(),
          `+${e.files_added} / −${e.files_removed}`,
        ]), { class: 'history-table' }));
    } catch (e) {
      append(clear(box), h('p', { class: 'msg error' }, explain(e)));
    }
  });
  return details;
}

function contract(spec) {
  const key = new Set(spec.key || []);
  return [
    h('h3', {}, 'Schema'),
    table(['Column', 'Type', 'Required', 'PII', 'Key', 'Standardize', 'Description'],
      (spec.schema || []).map((c) => [
        h('code', {}, c.name), c.type, c.required ? 'yes' : '',
        c.pii ? h('span', { class: 'badge pii', title: `personal data: ${c.pii}` }, `PII: ${c.pii}`) : '',
        key.has(c.name) ? h('span', { class: 'badge key' }, 'key') : '',
        c.standardize || '', c.description || '',
      ]), { class: 'schema' }),
    spec.derive?.length ? [h('h3', {}, 'Derived columns'),
      table(['Column', 'Expression'], spec.derive.map((x) => [h('code', {}, x.name), h('code', {}, x.expr)]))] : null,
    h('h3', {}, 'Expectations'),
    spec.expectations?.length
      ? table(['Name', 'Rule', 'On failure'], spec.expectations.map((e) => [e.name, h('code', {}, e.rule), e.action || 'warn']))
      : h('p', { class: 'empty' }, 'No expectations.'),
    h('h3', {}, 'Access'),
    spec.access?.length
      ? table(['Role', 'Layers', 'Masked columns'], spec.access.map((a) => [a.role, a.layers.join(', '), (a.mask || []).join(', ') || '—']))
      : h('p', { class: 'empty' }, 'Admins only.'),
  ];
}

function quality(q, dead) {
  if (!q) return h('p', { class: 'empty' }, 'No batch has been processed yet.');
  const nums = ['rows_in', 'rows_out', 'quarantined', 'dropped', 'duplicates', 'invalid', 'dead_lettered'];
  return [
    h('dl', { class: 'counts' }, nums.map((k) => [h('dt', {}, k.replace('_', ' ')), h('dd', { 'data-count': k }, (q[k] ?? 0).toLocaleString())])),
    q.changes
      ? h('dl', { class: 'counts', 'aria-label': 'Changes applied' }, ['inserts', 'updates', 'deletes', 'stale', 'tombstones']
        .map((k) => [h('dt', {}, k), h('dd', { 'data-change': k }, (q.changes[k] ?? 0).toLocaleString())]))
      : null,
    hourly(q.by_hour),
    h('p', { class: 'desc' }, `${q.batches} batches, the last at ${q.last_batch_at ? new Date(q.last_batch_at).toLocaleString() : '—'} (Silver version ${q.last_silver_version ?? '—'})`),
    Object.keys(q.expectations || {}).length
      ? table(['Expectation', 'Action', 'Passed', 'Failed'], Object.entries(q.expectations).map(([n, e]) => [n, e.action, e.passed.toLocaleString(), e.failed.toLocaleString()]))
      : null,
    dead ? h('p', { class: 'msg warn' }, `Last dead letter: ${dead.reason} (${dead.stage}, ${dead.at})`) : null,
  ];
}

/// Quality over time: rows in, rows out and quarantined per hour, as bars.
function hourly(byHour) {
  const hours = Object.entries(byHour || {}).slice(-48);
  if (!hours.length) return null;
  const series = [['rows_in', 'rows in'], ['rows_out', 'rows out'], ['quarantined', 'quarantined']];
  const max = Math.max(1, ...hours.flatMap(([, c]) => series.map(([k]) => c[k])));
  const group = 3 * 10 + 8;
  const [width, height, top, bottom] = [Math.max(320, hours.length * group + 50), 180, 16, 34];
  const y = (v) => top + (height - top - bottom) * (1 - v / max);
  const label = (iso) => new Date(iso).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit' });
  return h('figure', { class: 'quality-chart' },
    svg('svg', { class: 'quality', viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
      'aria-label': `Rows in, rows out and quarantined per hour over the last ${hours.length} hour(s)` },
      svg('text', { x: 4, y: 12, class: 'axis' }, max.toLocaleString()),
      svg('line', { x1: 40, x2: width, y1: y(0), y2: y(0), class: 'axis' }),
      hours.map(([hour, c], i) => svg('g', { 'data-hour': hour },
        series.map(([k, name], j) => {
          const x = 44 + i * group + j * 10;
          return svg('rect', { x, y: y(c[k]), width: 9, height: Math.max(0, y(0) - y(c[k])), class: `bar ${k}`, 'data-value': c[k] },
            svg('title', {}, `${label(hour)}: ${c[k].toLocaleString()} ${name}`));
        }),
        svg('text', { x: 44 + i * group, y: height - 18, class: 'axis' }, label(hour))))),
    h('figcaption', {}, series.map(([k, name]) => h('span', { class: `key ${k}` }, name)), ' per hour (UTC hours, shown in your time zone)'));
}

async function revisions(box, d, p) {
  let versions;
  try {
    versions = (await api(`/v1/products/${d}/${p}/versions`)).versions;
  } catch (e) {
    append(clear(box), h('p', { class: 'msg error' }, explain(e)));
    return;
  }
  const opts = (sel) => versions.map((v) => h('option', { value: v.revision, selected: v.revision === sel },
    `revision ${v.revision} · ${new Date(v.at).toLocaleString()}${v.deleted ? ' (deleted)' : ''}`));
  const last = versions[versions.length - 1].revision;
  const prev = versions.length > 1 ? versions[versions.length - 2].revision : last;
  const from = h('select', { id: 'rev-from' }, opts(prev));
  const to = h('select', { id: 'rev-to' }, opts(last));
  const out = h('div', { class: 'diff-out', 'aria-live': 'polite' });
  const show = () => {
    const doc = (r) => versions.find((v) => String(v.revision) === r.value)?.document || '';
    append(clear(out), diffView(doc(from), doc(to)));
  };
  append(clear(box), 
    h('p', {}, `${versions.length} revision${versions.length === 1 ? '' : 's'} stored.`),
    h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); show(); } },
      h('label', { for: 'rev-from' }, 'From'), from,
      h('label', { for: 'rev-to' }, 'To'), to,
      h('button', { type: 'submit' }, 'Show the difference')),
    out);
  if (versions.length > 1) show();
}

/// Lines of `a` and `b` as kept, removed and added (longest common subsequence).
export function diffLines(a, b) {
  const x = a.split('\n');
  const y = b.split('\n');
  const n = x.length;
  const m = y.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push([' ', x[i]]); i++; j++; }
    else if (j < m && (i >= n || lcs[i][j + 1] >= lcs[i + 1][j])) { out.push(['+', y[j]]); j++; }
    else { out.push(['-', x[i]]); i++; }
  }
  return out;
}

function diffView(a, b) {
  const lines = diffLines(a, b);
  const changed = lines.filter(([k]) => k !== ' ').length;
  return [
    h('p', {}, changed ? `${changed} line${changed === 1 ? '' : 's'} changed.` : 'The two revisions are the same.'),
    h('pre', { class: 'diff code', 'aria-label': 'Difference between the two revisions' },
      lines.map(([k, l]) => h('span', { class: k === '+' ? 'add' : k === '-' ? 'del' : 'same' },
        h('span', { class: 'offscreen' }, k === '+' ? 'added: ' : k === '-' ? 'removed: ' : ''),
        `${k} ${l}\n`))),
  ];
}

export async function renderQuarantine(page, { match: [, d, p], current }) {
  const name = `silver.${d}.${p}__quarantine`;
  const sql = `SELECT * FROM ${name} LIMIT 200`;
  append(clear(page), 
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/products' }, 'Products'), ' / ',
      h('a', { href: `#/products/${d}/${p}` }, `${d}.${p}`), ' / quarantine'),
    h('h1', { tabindex: -1 }, `Quarantined rows of ${d}.${p}`),
    h('p', {}, 'Rows that failed an expectation whose action is quarantine, with the reason. The raw ',
      h('code', {}, 'payload'), ' is shown to admins only (the API masks it for other roles).'),
    h('p', {}, h('code', {}, sql), ' ', h('a', { href: `#/sql?q=${encodeURIComponent(sql)}` }, 'Open in the SQL editor')));
  let res;
  try {
    res = await api('/v1/query', { method: 'POST', body: { sql } });
  } catch (e) {
    append(page, h('p', { class: 'msg error', role: 'alert' }, explain(e)));
    return;
  }
  if (!current()) return;
  // The raw input arrives as bytes (hex in JSON); shown as the text it was.
  for (const r of res.rows) if (typeof r.payload === 'string') r.payload = fromHex(r.payload);
  append(page, h('p', { class: 'count' }, `${res.row_count} row${res.row_count === 1 ? '' : 's'}${res.truncated ? ' (truncated)' : ''}`), grid(res));
}

function fromHex(hex) {
  if (!/^([0-9a-f]{2})*$/i.test(hex)) return hex;
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
  return new TextDecoder('utf-8', { fatal: false }).decode(bytes);
}
