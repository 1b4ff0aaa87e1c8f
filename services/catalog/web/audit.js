// The audit log (admin only: the API refuses anyone else, and its reason is
// what a non-admin sees here).

import { api, explain } from './api.js';
import { append, clear, h, table } from './dom.js';

export async function render(page, { params }) {
  const field = (name, label, placeholder) => h('label', {}, label,
    h('input', { name, type: 'text', value: params.get(name) || '', placeholder, autocomplete: 'off' }));
  const form = h('form', { class: 'filters', 'aria-label': 'Filter the audit log' },
    field('user', 'User', 'token subject'),
    field('product', 'Product', 'e.g. finance.payments'),
    field('since', 'Since', 'RFC 3339'),
    h('button', { type: 'submit' }, 'Filter'));
  const out = h('div', { 'aria-live': 'polite' });
  const load = async (p) => {
    append(clear(out), h('p', { class: 'loading' }, 'Loading…'));
    try {
      const q = new URLSearchParams();
      for (const k of ['user', 'product', 'since']) if (p.get(k)) q.set(k, p.get(k));
      q.set('limit', '500');
      const { records } = await api(`/v1/audit?${q}`);
      // Newest first: the question is usually "what just happened".
      records.reverse();
      append(clear(out), 
        h('p', { class: 'count' }, `${records.length} record${records.length === 1 ? '' : 's'} (newest first, at most 500)`),
        table(['When', 'User', 'Action', 'Target', 'Allowed', 'Rows', 'Reason'], records.map((r) => [
          new Date(r.at).toLocaleString(), r.user, r.action, h('code', { class: 'wrap' }, r.target),
          h('span', { class: `badge ${r.allowed ? 'fresh' : 'stale'}` }, r.allowed ? 'allowed' : 'denied'),
          r.rows ?? '', r.reason || '',
        ]), { class: 'audit' }));
    } catch (e) {
      append(clear(out), h('p', { class: 'msg error', role: 'alert' }, explain(e)));
    }
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) p.set(k, v);
    history.replaceState(null, '', `#/audit${p.size ? `?${p}` : ''}`);
    load(p);
  });
  append(clear(page), h('h1', { tabindex: -1 }, 'Audit log'), form, out);
  await load(params);
}
