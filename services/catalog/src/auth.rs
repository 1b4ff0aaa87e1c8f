//! Bearer tokens: a JWT verified with exactly one configured algorithm
//! (HS256 with a secret, or RS256 with a public key or a JWKS file), so
//! `alg: none` and HS/RS confusion are refused by construction. Roles come
//! from the `roles` claim only.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Clone)]
pub struct Verifier {
    /// Keys by `kid` (`None`: a key without an id, from a PEM file).
    keys: Vec<(Option<String>, DecodingKey)>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

/// The caller, once verified.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub roles: Vec<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }
}

impl Verifier {
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self::new(
            DecodingKey::from_secret(secret).expect("any byte string is an HMAC key"),
            Algorithm::HS256,
            issuer,
            audience,
        )
    }

    /// RS256 with the key(s) of `file`: a PEM public key, or a JWKS
    /// (`{"keys": [...]}`, RSA keys chosen by the token's `kid`).
    pub fn rs256(
        file: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, String> {
        let keys = if file.trim_ascii_start().starts_with(b"{") {
            let set: JwkSet =
                serde_json::from_slice(file).map_err(|e| format!("not a JWKS document: {e}"))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                if !matches!(
                    jwk.algorithm,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                ) {
                    continue;
                }
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("JWKS key {:?}: {e}", jwk.common.key_id))?;
                keys.push((jwk.common.key_id.clone(), key));
            }
            if keys.is_empty() {
                return Err("the JWKS holds no RSA key".into());
            }
            keys
        } else {
            vec![(
                None,
                DecodingKey::from_rsa_pem(file)
                    .map_err(|e| format!("not an RSA public key in PEM: {e}"))?,
            )]
        };
        Ok(Self::with_keys(keys, Algorithm::RS256, issuer, audience))
    }

    fn new(key: DecodingKey, alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self::with_keys(vec![(None, key)], alg, issuer, audience)
    }

    fn with_keys(
        keys: Vec<(Option<String>, DecodingKey)>,
        alg: Algorithm,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 5;
        // jsonwebtoken ignores `nbf` unless asked: a token that is not valid
        // yet must be refused like an expired one.
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked when
        // present: jsonwebtoken accepts a token without `iss`/`aud` unless
        // the claim is in the required set.
        let mut required = vec!["exp", "sub"];
        required.extend(issuer.map(|_| "iss"));
        required.extend(audience.map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        if let Some(i) = issuer {
            validation.set_issuer(&[i]);
        }
        match audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        Verifier { keys, validation }
    }

    /// Verifies `Authorization: Bearer <jwt>`; the error says why (for the audit log).
    pub fn verify(&self, header: Option<&str>) -> Result<Caller, String> {
        let header = header.ok_or("no Authorization header")?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or("Authorization is not a Bearer token")?;
        let token = token.trim();
        let kid = decode_header(token)
            .map_err(|e| format!("invalid token: {e}"))?
            .kid;
        let key = match (&kid, self.keys.as_slice()) {
            (None, [(_, only)]) => only,
            (Some(k), keys) => keys
                .iter()
                .find(|(id, _)| id.as_deref() == Some(k.as_str()))
                .or_else(|| keys.iter().find(|(id, _)| id.is_none()))
                .map(|(_, key)| key)
                .ok_or_else(|| format!("invalid token: no key with kid {k:?}"))?,
            (None, _) => {
                return Err("invalid token: no kid, and several keys could verify it".into());
            }
        };
        let data = decode::<Claims>(token, key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        Ok(Caller {
            user: data.claims.sub,
            roles: data.claims.roles,
        })
    }
}

/// Mints a token (the CLI's local admin token, and tests).
pub fn mint_hs256(secret: &[u8], sub: &str, roles: &[&str], ttl_secs: u64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + ttl_secs;
    let claims = Claims {
        sub: sub.to_string(),
        exp,
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).expect("any byte string is an HMAC key"),
    )
    .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = include_str!("../tests/fixtures/test_rsa_private.pem");
    const PUBLIC: &str = include_str!("../tests/fixtures/test_rsa_public.pem");
    const JWKS: &str = include_str!("../tests/fixtures/test_jwks.json");

    fn rs256_token(kid: Option<&str>, roles: &[&str]) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_string);
        let claims = Claims {
            sub: "ada".into(),
            exp: 4_102_444_800,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        };
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap();
        format!(
            "Bearer {}",
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        )
    }

    #[test]
    fn rs256_with_a_pem_key() {
        let v = Verifier::rs256(PUBLIC.as_bytes(), None, None).unwrap();
        let c = v.verify(Some(&rs256_token(None, &["admin"]))).unwrap();
        assert!(c.is_admin());
        // An HS256 token signed with the public key as secret (key confusion) is refused.
        let confused = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &Claims {
                sub: "eve".into(),
                exp: 4_102_444_800,
                roles: vec!["admin".into()],
            },
            &jsonwebtoken::EncodingKey::from_secret(PUBLIC.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify(Some(&format!("Bearer {confused}"))).is_err());
    }

    #[test]
    fn rs256_with_a_jwks_file_picks_the_key_by_kid() {
        let v = Verifier::rs256(JWKS.as_bytes(), None, None).unwrap();
        assert_eq!(
            v.verify(Some(&rs256_token(Some("test-2026"), &["analyst"])))
                .unwrap()
                .roles,
            vec!["analyst"]
        );
        let e = v
            .verify(Some(&rs256_token(Some("rotated-away"), &["admin"])))
            .unwrap_err();
        assert!(e.contains("no key with kid"), "{e}");
        // The only key in the set verifies a token without a kid.
        assert!(v.verify(Some(&rs256_token(None, &["admin"]))).is_ok());
    }

    fn hs256_token(claims: serde_json::Value) -> String {
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"unit-test-secret-0123456789abcdef").unwrap(),
        )
        .unwrap();
        format!("Bearer {t}")
    }

    #[test]
    fn a_token_that_is_not_valid_yet_is_refused() {
        let v = Verifier::hs256(b"unit-test-secret-0123456789abcdef", None, None);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = |nbf: u64| serde_json::json!({"sub": "eve", "exp": now + 7200, "nbf": nbf, "roles": ["admin"]});
        let e = v
            .verify(Some(&hs256_token(claims(now + 3600))))
            .unwrap_err();
        assert!(e.contains("ImmatureSignature"), "{e}");
        // Within the leeway, and in the past: fine.
        assert!(v.verify(Some(&hs256_token(claims(now + 2)))).is_ok());
        assert!(v.verify(Some(&hs256_token(claims(now - 60)))).is_ok());
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required() {
        let v = Verifier::hs256(
            b"unit-test-secret-0123456789abcdef",
            Some("https://idp.example/"),
            Some("medallion"),
        );
        let exp = 4_102_444_800u64;
        let good = serde_json::json!({"sub": "ada", "exp": exp, "roles": ["admin"], "iss": "https://idp.example/", "aud": "medallion"});
        assert!(v.verify(Some(&hs256_token(good.clone()))).is_ok());
        for (claim, wrong) in [("iss", "https://evil.example/"), ("aud", "another-api")] {
            let mut c = good.clone();
            c[claim] = serde_json::json!(wrong);
            assert!(
                v.verify(Some(&hs256_token(c.clone()))).is_err(),
                "wrong {claim}"
            );
            c.as_object_mut().unwrap().remove(claim);
            let e = v.verify(Some(&hs256_token(c))).unwrap_err();
            assert!(e.contains("Missing required claim"), "no {claim}: {e}");
        }
        // Without a configured issuer or audience, neither is needed.
        let open = Verifier::hs256(b"unit-test-secret-0123456789abcdef", None, None);
        let bare = serde_json::json!({"sub": "ada", "exp": exp, "roles": ["admin"]});
        assert!(open.verify(Some(&hs256_token(bare))).is_ok());
    }

    #[test]
    fn a_bad_key_file_names_the_problem() {
        assert!(
            Verifier::rs256(b"{\"keys\": []}", None, None)
                .unwrap_err()
                .contains("no RSA key")
        );
        assert!(
            Verifier::rs256(b"not a key", None, None)
                .unwrap_err()
                .contains("PEM")
        );
    }
}
