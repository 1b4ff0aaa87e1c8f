//! Bearer tokens: a JWT verified with exactly one configured algorithm
//! (HS256 with a secret, or RS256 with a public key), so `alg: none` and
//! HS/RS confusion are refused by construction. Roles come from the `roles`
//! claim only.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
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
    key: DecodingKey,
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

    pub fn rs256_pem(
        pem: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, String> {
        let key = DecodingKey::from_rsa_pem(pem)
            .map_err(|e| format!("not an RSA public key in PEM: {e}"))?;
        Ok(Self::new(key, Algorithm::RS256, issuer, audience))
    }

    fn new(key: DecodingKey, alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(i) = issuer {
            validation.set_issuer(&[i]);
        }
        match audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        Verifier { key, validation }
    }

    /// Verifies `Authorization: Bearer <jwt>`; the error says why (for the audit log).
    pub fn verify(&self, header: Option<&str>) -> Result<Caller, String> {
        let header = header.ok_or("no Authorization header")?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or("Authorization is not a Bearer token")?;
        let data = decode::<Claims>(token.trim(), &self.key, &self.validation)
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
