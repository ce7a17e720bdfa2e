//! The HTTP layer under object_store: ours, so that a hostile or old store cannot do harm.
//! - A listing is bounded: pages counted, each page read with a size cap, keys the client cannot
//!   take as paths passed over.
//! - Every PUT with a body (a part, a record, a segment) carries its `Content-MD5`, which every
//!   S3 store checks. A `400 BadDigest` (bytes changed on the way) sends the same request again.
//!   An answer whose ETag is an MD5 other than the body's (the store holds other bytes than
//!   were sent) sends it again too. The MD5 of each part as sent is kept for the confirmation
//!   of the whole object.
//! - A request refused for a header it carried (a checksum, `If-None-Match`) is noted in
//!   `caps`, for the caller to send it again without.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use md5::Digest;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpService,
};
use object_store::path::Path as ObjectPath;
use object_store::ClientOptions;

use super::caps;
use crate::error::bounded;

/// Bounds on a listing: pages (S3 gives up to 1000 keys a page), one page's XML, keys kept,
/// and the time it may take. A store past any of them gets a clear error, not our memory.
pub const LIST_PAGES_MAX: u32 = 1000;
const LIST_PAGE_BYTES_MAX: usize = 16 << 20;
pub const LIST_KEYS_MAX: usize = 100_000;
pub const LIST_DEADLINE: Duration = Duration::from_secs(120);

/// Times a PUT is sent again when the store says its bytes changed on the way.
const PUT_TRIES: usize = 4;

/// The part MD5s of uploads, by upload id and part number.
pub type PartDigests = BTreeMap<(String, u32), [u8; 16]>;

/// What the HTTP layer saw: listing pages requested, keys taken out, MD5s of parts sent.
#[derive(Debug, Default, Clone)]
pub struct Watch {
    pub pages: Arc<AtomicU32>,
    pub skipped: Arc<Mutex<Vec<String>>>,
    pub parts: Arc<Mutex<PartDigests>>,
}

impl Watch {
    /// The MD5s of parts 1..=`count` of upload `id` as last sent; `None` if one is missing.
    pub fn part_digests(&self, id: &str, count: usize) -> Option<Vec<[u8; 16]>> {
        let parts = self.parts.lock().ok()?;
        (1..=count)
            .map(|n| parts.get(&(id.to_string(), n as u32)).copied())
            .collect()
    }

    pub fn forget(&self, id: &str) {
        if let Ok(mut p) = self.parts.lock() {
            p.retain(|(u, _), _| u != id);
        }
    }
}

#[derive(Debug)]
pub struct Connector {
    pub client: reqwest::Client,
    pub watch: Watch,
}

impl HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Guarded {
            client: self.client.clone(),
            watch: self.watch.clone(),
        }))
    }
}

#[derive(Debug)]
struct Guarded {
    client: reqwest::Client,
    watch: Watch,
}

fn refused(what: String) -> HttpError {
    // `Decode` is never retried.
    HttpError::new(HttpErrorKind::Decode, io::Error::other(what))
}

#[async_trait::async_trait]
impl HttpService for Guarded {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        // S3's and GCS's ListObjectsV2, Azure's List Blobs.
        let listing = req.method() == http::Method::GET
            && req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "list-type=2" || p == "comp=list"));
        if listing {
            return self.listing(req).await;
        }
        if req.method() == http::Method::PUT && req.body().content_length() > 0 {
            return self.put(req).await;
        }
        let carried = caps::Carried::of(req.headers());
        let response = self.client.call(req).await?;
        if carried.any() {
            return noting_refusal(carried, response).await;
        }
        Ok(response)
    }
}

/// Reads an error answer's body (bounded) and puts it back.
async fn error_body(response: HttpResponse) -> Result<(HttpResponse, String), HttpError> {
    let (parts, body) = response.into_parts();
    let mut stream = body.bytes_stream();
    let mut text = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        if text.len() + piece.len() > 64 << 10 {
            break;
        }
        text.extend_from_slice(&piece);
    }
    let shown = String::from_utf8_lossy(&text).into_owned();
    Ok((HttpResponse::from_parts(parts, text.into()), shown))
}

async fn noting_refusal(
    carried: caps::Carried,
    response: HttpResponse,
) -> Result<HttpResponse, HttpError> {
    let status = response.status().as_u16();
    if status != 400 && status != 501 {
        return Ok(response);
    }
    let (response, body) = error_body(response).await?;
    if caps::is_refusal(status, &body) {
        caps::refused(carried, status, &body);
    }
    Ok(response)
}

/// The MD5 of a request body, read from a cheap clone of it (no copy of the bytes).
async fn body_md5(body: &HttpRequestBody) -> Result<[u8; 16], HttpError> {
    use http_body_util::BodyExt;
    let mut body = body.clone();
    let mut h = md5::Md5::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            h.update(&data);
        }
    }
    Ok(h.finalize().into())
}

/// The upload id and part number of an UploadPart request.
fn part_of(uri: &http::Uri) -> Option<(String, u32)> {
    let q = uri.query()?;
    let get = |name: &str| {
        q.split('&')
            .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    let id = get("uploadId")?;
    let id = percent_decode(&id);
    Some((id, get("partNumber")?.parse().ok()?))
}

/// `%XX` escapes of a URL's path or query decoded (an invalid escape is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An ETag that is an MD5 (32 hex digits, quoted or not).
pub fn md5_etag(etag: &str) -> Option<String> {
    let t = etag.trim().trim_matches('"').to_ascii_lowercase();
    (t.len() == 32 && t.bytes().all(|c| c.is_ascii_hexdigit())).then_some(t)
}

impl Guarded {
    /// Sends a PUT with its `Content-MD5`, again (up to `PUT_TRIES`) while the store answers
    /// `BadDigest` or holds bytes whose MD5 is not the body's.
    async fn put(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        use base64::Engine;
        let (mut head, body) = req.into_parts();
        let md5 = body_md5(&body).await?;
        let md5_hex = hex::encode(md5);
        // Azure's SharedKey signs Content-MD5 itself: one added after signing would break the
        // signature, so there the object's confirmation (read back) is what checks the bytes.
        let shared_key = head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("SharedKey "));
        if !shared_key && !head.headers.contains_key("content-md5") {
            let value = base64::engine::general_purpose::STANDARD.encode(md5);
            head.headers.insert(
                "content-md5",
                http::HeaderValue::from_str(&value).expect("base64 is a header value"),
            );
        }
        let carried = caps::Carried::of(&head.headers);
        let part = part_of(&head.uri);
        let mut tries = 0;
        loop {
            tries += 1;
            let req = HttpRequest::from_parts(head.clone(), body.clone());
            let response = self.client.call(req).await?;
            let status = response.status().as_u16();
            if response.status().is_success() {
                let etag = response
                    .headers()
                    .get(http::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .and_then(md5_etag);
                match etag {
                    Some(e) if e != md5_hex => {
                        if tries < PUT_TRIES {
                            continue;
                        }
                        return Err(refused(format!(
                            "the store holds bytes whose MD5 is {e} after {PUT_TRIES} tries of \
                             a body whose MD5 is {md5_hex}: something between here and the \
                             store changes the data"
                        )));
                    }
                    _ => {}
                }
                if let (Some(p), Ok(mut parts)) = (part, self.watch.parts.lock()) {
                    parts.insert(p, md5);
                }
                return Ok(response);
            }
            if status != 400 && status != 501 {
                return Ok(response);
            }
            let (response, text) = error_body(response).await?;
            // S3's and GCS's `BadDigest`, Azure's `Md5Mismatch`.
            let changed = text.contains("<Code>BadDigest</Code>")
                || text.contains("<Code>Md5Mismatch</Code>");
            if status == 400 && changed && tries < PUT_TRIES {
                continue;
            }
            if carried.any() && caps::is_refusal(status, &text) {
                caps::refused(carried, status, &text);
            }
            return Ok(response);
        }
    }

    /// Counts listing pages and reads each one with a size cap before object_store parses it.
    async fn listing(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        if self.watch.pages.fetch_add(1, Ordering::SeqCst) >= LIST_PAGES_MAX {
            return Err(refused(format!(
                "the listing did not end after {LIST_PAGES_MAX} pages; the store keeps saying \
                 there is more"
            )));
        }
        let response = self.client.call(req).await?;
        let (parts, body) = response.into_parts();
        let mut stream = body.bytes_stream();
        let mut page = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            if page.len() + piece.len() > LIST_PAGE_BYTES_MAX {
                return Err(refused(format!(
                    "a listing page is larger than {} MiB; no S3 server sends that",
                    LIST_PAGE_BYTES_MAX >> 20
                )));
            }
            page.extend_from_slice(&piece);
        }
        let page = match String::from_utf8(page) {
            Ok(text) => {
                let (kept, skipped) = drop_unusable_keys(&text);
                if let Ok(mut s) = self.watch.skipped.lock() {
                    s.extend(skipped);
                }
                kept.into_bytes()
            }
            Err(e) => e.into_bytes(),
        };
        Ok(HttpResponse::from_parts(parts, page.into()))
    }
}

/// Takes out of a ListObjectsV2 page the `<Contents>` entries whose key the client could not
/// take as a path (`a//b`, `..`): one such key would fail the whole listing. Returns the page
/// and the keys taken out, for the operator to see.
fn drop_unusable_keys(page: &str) -> (String, Vec<String>) {
    // S3's and GCS's `<Contents><Key>`, Azure's `<Blob><Name>`.
    let (open, close, key_open, key_close) = if page.contains("<EnumerationResults") {
        ("<Blob>", "</Blob>", "<Name>", "</Name>")
    } else {
        ("<Contents>", "</Contents>", "<Key>", "</Key>")
    };
    let mut out = String::with_capacity(page.len());
    let mut skipped = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(open) {
        let Some(len) = rest[start..].find(close) else {
            break;
        };
        let end = start + len + close.len();
        let entry = &rest[start..end];
        out.push_str(&rest[..start]);
        let key = entry
            .split_once(key_open)
            .and_then(|(_, k)| k.split_once(key_close))
            .map(|(k, _)| xml_unescape(k));
        match key {
            Some(k) if ObjectPath::parse(&k).is_err() => skipped.push(bounded(&k, 300)),
            _ => out.push_str(entry),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    (out, skipped)
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';').filter(|&n| n <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let entity = &tail[1..semi];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
