// The SQL editor: POST /v1/query with optional time travel, the answer in
// a grid, and downloads (CSV built here from the JSON answer; Arrow as the
// API streams it).

import { api, explain } from './api.js';
import { append, clear, download, h } from './dom.js';

const ARROW = 'application/vnd.apache.arrow.stream';

export async function render(page, { params }) {
  const editor = h('textarea', {
    id: 'sql-text', name: 'sql', rows: 6, spellcheck: 'false', class: 'code',
    'aria-describedby': 'sql-help',
  });
  editor.value = params.get('q') || 'SELECT * FROM gold.finance.revenue_by_country_hourly LIMIT 100';
  const travel = h('select', { id: 'sql-travel', name: 'travel' },
    h('option', { value: '' }, 'latest'),
    h('option', { value: 'version' }, 'at version'),
    h('option', { value: 'as_of' }, 'as of (RFC 3339)'));
  const at = h('input', { id: 'sql-at', name: 'at', type: 'text', disabled: true, placeholder: 'e.g. 3 or 2026-11-29T10:00:00Z', autocomplete: 'off' });
  travel.addEventListener('change', () => {
    at.disabled = !travel.value;
    if (travel.value) at.focus();
  });
  const out = h('div', { id: 'sql-out', 'aria-live': 'polite' });
  const csv = h('button', { type: 'button', id: 'csv', disabled: true }, 'Download CSV');
  const arrow = h('button', { type: 'button', id: 'arrow' }, 'Download Arrow');
  let last = null;

  const request = () => {
    const body = { sql: editor.value };
    if (travel.value === 'version') {
      const v = Number(at.value);
      if (!Number.isInteger(v) || v < 0) throw new Error('the version is a whole number, e.g. 3');
      body.version = v;
    } else if (travel.value === 'as_of') {
      body.as_of = at.value.trim();
    }
    return body;
  };
  const run = async () => {
    append(clear(out), h('p', { class: 'loading' }, 'Running…'));
    csv.disabled = true;
    try {
      const t0 = performance.now();
      last = await api('/v1/query', { method: 'POST', body: request() });
      const ms = Math.round(performance.now() - t0);
      append(clear(out), 
        h('p', { class: 'count' }, `${last.row_count} row${last.row_count === 1 ? '' : 's'} in ${ms} ms`,
          last.truncated ? ' — truncated at the catalog\'s row limit' : ''),
        grid(last));
      csv.disabled = false;
    } catch (e) {
      last = null;
      append(clear(out), h('p', { class: 'msg error', role: 'alert' }, e.status ? explain(e) : e.message));
    }
  };
  csv.addEventListener('click', () => {
    if (last) download(new Blob([toCsv(last)], { type: 'text/csv' }), 'query.csv');
  });
  arrow.addEventListener('click', async () => {
    try {
      download(await api('/v1/query', { method: 'POST', body: request(), accept: ARROW }), 'query.arrows');
    } catch (e) {
      append(clear(out), h('p', { class: 'msg error', role: 'alert' }, e.status ? explain(e) : e.message));
    }
  });
  editor.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      run();
    }
  });

  append(clear(page), 
    h('h1', { tabindex: -1 }, 'SQL'),
    h('form', { class: 'sql', onsubmit: (e) => { e.preventDefault(); run(); } },
      h('label', { for: 'sql-text' }, 'Query'),
      editor,
      h('p', { id: 'sql-help', class: 'hint' }, 'Read-only SQL over layer.domain.table names your roles may read; Ctrl+Enter runs it. Masked columns come back empty.'),
      h('div', { class: 'row' },
        h('label', { for: 'sql-travel' }, 'Time travel'), travel,
        h('label', { for: 'sql-at', class: 'offscreen' }, 'Version or instant'), at,
        h('button', { type: 'submit', id: 'run' }, 'Run'), csv, arrow)),
    out);
  if (params.get('q')) await run();
}

/// The answer as a table; a NULL (a masked column, or no value) is marked
/// as such, not shown as an empty string.
export function grid(res) {
  if (!res.columns.length) return h('p', { class: 'empty' }, 'No columns.');
  return h('div', { class: 'grid-wrap', tabindex: 0, role: 'region', 'aria-label': 'Query results' },
    h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, res.columns.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, res.rows.map((r) => h('tr', {}, res.columns.map((c) => cell(r[c])))))));
}

function cell(v) {
  if (v === null || v === undefined) return h('td', { class: 'null' }, h('span', { class: 'offscreen' }, 'null'), '∅');
  const text = typeof v === 'object' ? JSON.stringify(v) : String(v);
  return h('td', { class: typeof v === 'number' ? 'num' : null }, text);
}

export function toCsv(res) {
  const esc = (v) => {
    if (v === null || v === undefined) return '';
    const t = typeof v === 'object' ? JSON.stringify(v) : String(v);
    return /[",\n\r]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t;
  };
  return [res.columns.map(esc).join(','), ...res.rows.map((r) => res.columns.map((c) => esc(r[c])).join(','))].join('\r\n') + '\r\n';
}
