// The only way the pages get data: the catalog's HTTP API with the user's
// own token, so the API's grants and masks decide what is shown.

const KEY = 'medallion.token';

export const token = () => sessionStorage.getItem(KEY);
export const setToken = (t) => sessionStorage.setItem(KEY, t.trim());
export const forget = () => sessionStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/// `GET path` (or `method` with a JSON `body`); `accept` asks for another
/// format, answered as a Blob.
export async function api(path, { method = 'GET', body, accept } = {}) {
  const headers = { Authorization: `Bearer ${token() || ''}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (accept) headers.Accept = accept;
  let r;
  try {
    r = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, `the catalog did not answer (${e.message})`);
  }
  if (!r.ok) {
    let message = r.statusText;
    try {
      message = (await r.json()).error || message;
    } catch { /* not JSON: keep the status text */ }
    if (r.status === 401) window.dispatchEvent(new CustomEvent('medallion:unauthorized'));
    throw new ApiError(r.status, message);
  }
  return accept ? r.blob() : r.json();
}

/// A sentence for a failed call: the API's own reason, headed by what it means.
export function explain(e) {
  if (!(e instanceof ApiError)) return `Something went wrong: ${e.message}`;
  switch (e.status) {
    case 401: return `Not signed in: ${e.message}. Sign in with a valid token.`;
    case 403: return `Not allowed: ${e.message}.`;
    case 404: return `Not found: ${e.message}.`;
    case 429: return `Too many queries at once: ${e.message}. Try again in a moment.`;
    default: return e.status ? `Refused (${e.status}): ${e.message}` : e.message;
  }
}

/// The token's claims, for display only: the API verifies, the page does not.
export function claims() {
  try {
    const part = token().split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
  } catch {
    return {};
  }
}

export const isAdmin = () => (claims().roles || []).includes('admin');
