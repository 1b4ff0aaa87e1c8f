// Hash routing: every page has a URL (#/products, #/products/<d>/<p>,
// #/lineage/<d>/<p>, #/quarantine/<d>/<p>, #/sql, #/audit) that can be
// bookmarked and shared; the token never is, it lives in sessionStorage.

import { claims, explain, forget, setToken, token } from './api.js';
import { append, clear, h } from './dom.js';
import * as products from './products.js';
import * as product from './product.js';
import * as lineage from './lineage.js';
import * as sql from './sql.js';
import * as audit from './audit.js';

const NAME = '([a-z][a-z0-9_]*)';
const ROUTES = [
  [/^\/products$/, 'products', products.render],
  [new RegExp(`^/products/${NAME}/${NAME}$`), 'products', product.render],
  [new RegExp(`^/lineage/${NAME}/${NAME}$`), 'products', lineage.render],
  [new RegExp(`^/quarantine/${NAME}/${NAME}$`), 'products', product.renderQuarantine],
  [/^\/sql$/, 'sql', sql.render],
  [/^\/audit$/, 'audit', audit.render],
];

const $ = (id) => document.getElementById(id);
let generation = 0;

export function status(message, kind = 'info') {
  const el = $('status');
  clear(el);
  if (message) el.append(h('p', { class: `msg ${kind}` }, message));
}

function takeTokenFromUrl() {
  // A link `/#token=<jwt>` signs in; the token leaves the URL (and the
  // history) at once, so it is not bookmarked, shared or shown.
  const m = location.hash.match(/^#token=([^&]+)/);
  if (!m) return;
  setToken(decodeURIComponent(m[1]));
  history.replaceState(null, '', `${location.pathname}${location.search}#/products`);
}

function showSignedIn(signedIn) {
  $('login').hidden = signedIn;
  $('nav').hidden = !signedIn;
  $('signout').hidden = !signedIn;
  $('who').hidden = !signedIn;
  if (signedIn) {
    const c = claims();
    $('who').textContent = `${c.sub || '?'} · ${(c.roles || []).join(', ') || 'no roles'}`;
  }
}

async function route() {
  const mine = ++generation;
  const view = $('view');
  if (!token()) {
    showSignedIn(false);
    clear(view);
    $('token').focus();
    return;
  }
  showSignedIn(true);
  const raw = location.hash.slice(1) || '/products';
  const [path, query = ''] = raw.split('?');
  const params = new URLSearchParams(query);
  const found = ROUTES.map(([re, section, render]) => [path.match(re), section, render])
    .find(([m]) => m);
  for (const a of document.querySelectorAll('#nav a')) {
    if (found && a.dataset.section === found[1]) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  status('');
  // Which page the view shows and whether it has its data: what tests
  // (and assistive tools) can wait on instead of guessing.
  view.dataset.route = location.hash;
  view.dataset.state = 'loading';
  view.setAttribute('aria-busy', 'true');
  const page = h('div', { class: 'page' });
  append(clear(view), page);
  if (!found) {
    append(page, h('h1', { tabindex: -1 }, 'No such page'), h('p', {}, h('a', { href: '#/products' }, 'Back to the products')));
    view.dataset.state = 'ready';
    view.removeAttribute('aria-busy');
    return;
  }
  append(page, h('p', { class: 'loading' }, 'Loading…'));
  try {
    await found[2](page, { match: found[0], params, current: () => mine === generation });
  } catch (e) {
    if (mine !== generation) return;
    append(clear(page), h('h1', { tabindex: -1 }, 'Could not load this page'),
      h('p', { class: 'msg error', role: 'alert' }, explain(e)));
  }
  if (mine !== generation) return;
  page.querySelector('.loading')?.remove();
  view.dataset.state = 'ready';
  view.removeAttribute('aria-busy');
  // Screen readers and keyboards land on the new page, not the old link.
  page.querySelector('h1')?.focus({ preventScroll: true });
}

$('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const t = $('token').value.trim();
  if (!t) return;
  setToken(t);
  $('token').value = '';
  if (!location.hash || location.hash === '#') location.hash = '#/products';
  else route();
});

$('signout').addEventListener('click', () => {
  forget();
  status('Signed out.');
  route();
});

window.addEventListener('medallion:unauthorized', () => {
  // An expired or refused token: ask for a new one, keep the page's URL.
  forget();
  showSignedIn(false);
});

window.addEventListener('hashchange', () => {
  takeTokenFromUrl();
  route();
});

takeTokenFromUrl();
route();
