// The product list: the API's own search (text, domain, owner, tag) plus
// two filters the list answer already carries (layer, freshness breach).
// Filters live in the URL, so a filtered list can be shared.

import { api } from './api.js';
import { ago, append, clear, h, layerOf } from './dom.js';

const SERVER = ['q', 'domain', 'owner', 'tag'];

export async function render(page, { params, current }) {
  // Every visible product once, for the filter choices.
  const all = (await api('/v1/products')).products;
  if (!current()) return;
  const choices = (f) => [...new Set(all.flatMap(f))].sort();
  const results = h('div', { id: 'results' });
  const count = h('p', { class: 'count', role: 'status', 'aria-live': 'polite' });

  const select = (name, label, values) => h('label', {}, label,
    h('select', { name },
      h('option', { value: '' }, 'any'),
      values.map((v) => h('option', { value: v, selected: params.get(name) === v }, v))));
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Find a data product' },
    h('label', { class: 'grow' }, 'Search',
      h('input', { type: 'search', name: 'q', value: params.get('q') || '', placeholder: 'name or description', autocomplete: 'off' })),
    select('domain', 'Domain', choices((p) => [p.domain])),
    select('owner', 'Owner', choices((p) => [p.owner])),
    select('tag', 'Tag', choices((p) => p.tags)),
    select('layer', 'Layer', ['bronze', 'silver', 'gold']),
    h('label', { class: 'check' },
      h('input', { type: 'checkbox', name: 'stale', checked: params.get('stale') === '1' }),
      'Freshness breached'));

  let timer;
  const refresh = async () => {
    const fd = new FormData(form);
    const p = new URLSearchParams();
    for (const [k, v] of fd) if (v) p.set(k, k === 'stale' ? '1' : v);
    // The URL follows the filters without a new history entry per keystroke.
    history.replaceState(null, '', `#/products${p.size ? `?${p}` : ''}`);
    await show(results, count, p);
  };
  form.addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(refresh, 200);
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    refresh();
  });

  append(clear(page), 
    h('h1', { tabindex: -1 }, 'Data products'),
    form, count, results);
  await show(results, count, params, all);
  performance.mark('products-rendered');
}

async function show(results, count, params, all) {
  const q = new URLSearchParams();
  for (const k of SERVER) if (params.get(k)) q.set(k, params.get(k));
  let list = !q.size && all ? all : (await api(`/v1/products${q.size ? `?${q}` : ''}`)).products;
  const layer = params.get('layer');
  if (layer) list = list.filter((p) => p.tables.some((t) => layerOf(t.name) === layer));
  if (params.get('stale') === '1') list = list.filter((p) => p.tables.some((t) => t.freshness === 'stale'));
  list.sort((a, b) => `${a.domain}.${a.name}`.localeCompare(`${b.domain}.${b.name}`));
  count.textContent = `${list.length} product${list.length === 1 ? '' : 's'}`;
  clear(results);
  if (!list.length) {
    append(results, h('p', { class: 'empty' }, 'No product you may see matches these filters.'));
    return;
  }
  append(results, h('table', { class: 'products' },
    h('caption', { class: 'offscreen' }, 'Data products you may see'),
    h('thead', {}, h('tr', {}, ['Product', 'Owner', 'Tags', 'Tables you may read', 'Freshness', 'Quality']
      .map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, list.map(row))));
}

function row(p) {
  const href = `#/products/${p.domain}/${p.name}`;
  const stale = p.tables.filter((t) => t.freshness === 'stale');
  const ages = p.tables.map((t) => t.age_seconds).filter((a) => a !== null && a !== undefined);
  const q = p.quality;
  return h('tr', { 'data-product': `${p.domain}.${p.name}` },
    h('td', {}, h('a', { href, class: 'product-link' }, h('span', { class: 'domain' }, `${p.domain}.`), p.name),
      h('div', { class: 'desc' }, p.description)),
    h('td', {}, p.owner),
    h('td', {}, p.tags.map((t) => h('a', { class: 'tag', href: `#/products?tag=${encodeURIComponent(t)}` }, t))),
    h('td', {}, p.tables.map((t) => h('span', {
      class: `layer ${layerOf(t.name)}${t.exists ? '' : ' missing'}`,
      title: t.exists ? `${t.name}: version ${t.version}, ${t.rows} rows` : `${t.name}: not written yet`,
    }, `${t.name.endsWith('__quarantine') ? 'quarantine' : layerOf(t.name)} ${t.exists ? `v${t.version}` : '—'}`))),
    h('td', {}, stale.length
      ? h('span', { class: 'badge stale' }, `stale (${stale.length})`)
      : (p.tables.some((t) => t.freshness === 'fresh') ? h('span', { class: 'badge fresh' }, 'fresh') : '—'),
    ages.length ? h('div', { class: 'desc' }, `last commit ${ago(Math.min(...ages))} ago`) : null),
    h('td', {}, q ? `${q.rows_out} out · ${q.quarantined} quarantined` : '—'));
}
