//! Blobs in an S3-compatible object store: `s3://BUCKET/PREFIX`, reached through object_store's
//! S3 client with path-style addressing (what self-hosted servers such as Garage or MinIO
//! expect), and the endpoint, region and credentials from the usual AWS variables unless the
//! settings name them.

use std::sync::Arc;

use object_store::{ObjectStore, aws::AmazonS3Builder, prefix::PrefixStore};

use crate::ServerError;

/// Where an S3 blob store is and how to reach it; what the settings leave out comes from the
/// `AWS_*` environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`).
/// A server's `[s3]` section holds the endpoint and region; credentials stay out of files that
/// get shared.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct S3Settings {
    /// The server's URL (`http://127.0.0.1:3900`); AWS's own when unset everywhere.
    pub endpoint: Option<String>,
    /// The region the bucket is in.
    pub region: Option<String>,
    /// The access key id and secret, for callers that hold them rather than the environment
    /// (an embedding program, the tests); a server reads them from the environment.
    #[serde(skip)]
    pub credentials: Option<(String, String)>,
}

/// The bucket and key prefix of `url` (`s3://bucket/prefix`), or `None` when it is not an S3
/// URL.
pub fn parse(url: &str) -> Option<Result<(String, String), ServerError>> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Some(Err(ServerError::Settings(format!(
            "blob store '{url}' names no bucket; write s3://BUCKET/PREFIX"
        ))));
    }
    Some(Ok((
        bucket.to_string(),
        prefix.trim_matches('/').to_string(),
    )))
}

/// Connects to the bucket of `url` with `settings`, keys under its prefix.
pub fn open(url: &str, settings: &S3Settings) -> Result<Arc<dyn ObjectStore>, ServerError> {
    let (bucket, prefix) = parse(url).ok_or_else(|| {
        ServerError::Settings(format!("blob store '{url}' is not an s3:// URL"))
    })??;
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_virtual_hosted_style_request(false);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &settings.region {
        builder = builder.with_region(region);
    }
    if let Some((key_id, secret)) = &settings.credentials {
        builder = builder
            .with_access_key_id(key_id)
            .with_secret_access_key(secret);
    }
    let endpoint = settings
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    if endpoint.is_some_and(|e| e.starts_with("http://")) {
        builder = builder.with_allow_http(true);
    }
    let store = builder.build().map_err(|e| {
        ServerError::Settings(format!(
            "blob store '{url}': {e} (set the endpoint, region and AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY)"
        ))
    })?;
    Ok(if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            parse("s3://models/run-7/").map(Result::ok),
            Some(Some(("models".into(), "run-7".into())))
        );
        assert_eq!(
            parse("s3://models").map(Result::ok),
            Some(Some(("models".into(), String::new())))
        );
        assert!(parse("s3:///x").is_some_and(|r| r.is_err()));
        assert!(parse("ferry-data/blobs").is_none());
    }
}
