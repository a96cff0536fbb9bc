//! Smoke tests of the S3 test harness (tests/common/s3.rs): each body runs against the in-process
//! s3s-fs server and, with `CUTOVERFS_TEST_GARAGE=/path/to/garage cargo test --test s3_harness --
//! --ignored`, against Garage. They also pin down how each server answers the failures the S3
//! dest has to classify.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use common::s3::{sha256_b64, CorruptingProxy, Kind, S3Server};
use futures_util::StreamExt;

const MARKER: &[u8] = b"<<cutoverfs-corrupt-me>>";

fn body_with_marker(len: usize) -> Vec<u8> {
    let mut body = common::pseudo_random(len, 7);
    // One marker in the middle (24 bytes: not in random data by chance).
    let mid = len / 2;
    body.splice(mid..mid, MARKER.iter().copied());
    body
}

s3_tests! {
    fn put_get_list_head_delete(server: &S3Server) {
        server.put("a/1.txt", b"hello");
        server.put("a/2.bin", &[0, 1, 2]);
        server.put("b/x", b"");
        assert_eq!(server.get("a/1.txt").as_deref(), Some(&b"hello"[..]));
        assert_eq!(server.get("b/x").as_deref(), Some(&b""[..]));
        assert_eq!(server.get("a/missing"), None);
        assert_eq!(
            server.list("a/"),
            [("a/1.txt".to_string(), 5), ("a/2.bin".to_string(), 3)]
        );
        assert_eq!(server.list("").len(), 3);

        // Metadata, content type and cache control as the S3 dest sets them.
        let client = server.client();
        server
            .block_on(
                client
                    .put_object()
                    .bucket(server.bucket())
                    .key("m/with-meta")
                    .metadata("sha256", "abc")
                    .metadata("Source-Mtime", "1700000000.5")
                    .content_type("image/png")
                    .cache_control("max-age=60")
                    .body(ByteStream::from_static(b"png"))
                    .send(),
            )
            .unwrap();
        let meta = server.head_metadata("m/with-meta").unwrap();
        assert_eq!(meta.get("sha256").map(String::as_str), Some("abc"));
        assert_eq!(meta.get("source-mtime").map(String::as_str), Some("1700000000.5"));
        assert_eq!(meta.get("content-type").map(String::as_str), Some("image/png"));
        assert_eq!(meta.get("cache-control").map(String::as_str), Some("max-age=60"));
        assert_eq!(server.head_metadata("m/none"), None);

        server.delete("a/1.txt");
        server.delete("a/1.txt"); // deleting a missing key succeeds
        assert_eq!(server.get("a/1.txt"), None);
        assert_eq!(server.list("a/"), [("a/2.bin".to_string(), 3)]);
    }

    /// More keys than one ListObjectsV2 page (1000).
    fn list_reads_all_pages(server: &S3Server) {
        let client = server.client();
        let bucket = server.bucket();
        server.block_on(async {
            futures_util::stream::iter(0..1005)
                .map(|i| {
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(format!("many/{i:04}"))
                        .body(ByteStream::from(vec![b'x'; i % 7]))
                        .send()
                })
                .buffer_unordered(32)
                .for_each(|r| async move {
                    r.unwrap();
                })
                .await
        });
        let listed = server.list("many/");
        assert_eq!(listed.len(), 1005);
        assert_eq!(listed[1004], ("many/1004".to_string(), (1004 % 7) as u64));
    }

    fn stop_refuses_then_start_again_keeps_data(server: &S3Server) {
        server.put("keep/me", b"before the outage");
        let port = server.port();
        server.stop();
        assert!(!server.is_listening());
        let err = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        // Same client as before the stop: its pooled keep-alive connection must not be served.
        let started = Instant::now();
        let failure = server.try_put("during/outage", b"x").unwrap_err();
        assert_eq!(failure.kind, "DispatchFailure", "{failure}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        server.stop(); // idempotent

        server.start_again();
        assert_eq!(server.port(), port);
        assert_eq!(server.get("keep/me").as_deref(), Some(&b"before the outage"[..]));
        server.put("after/outage", b"y");
        assert_eq!(server.list("during/"), []);
        assert_eq!(server.list("after/").len(), 1);
        server.start_again(); // no-op while running
    }

    /// A byte flipped on the wire in a PutObject carrying x-amz-checksum-sha256 is rejected;
    /// with times = 1 the second attempt passes untouched.
    fn corrupted_put_is_rejected(server: &S3Server) {
        let via = |p: &CorruptingProxy| {
            server.client_with(&p.endpoint(), &server.access_key(), &server.secret_key())
        };
        let proxy = CorruptingProxy::start(&server.endpoint(), MARKER, 1);
        let client = via(&proxy);
        let body = body_with_marker(100_000);

        let failure = server.try_put_with(&client, "c/1", &body).unwrap_err();
        assert_eq!(proxy.corrupted(), 1);
        // x-amz-content-sha256 (signed payload) catches it first.
        let expected = match server.kind() {
            // s3s checks the payload hash while s3s-fs copies the body: the copy fails (500).
            Kind::InProcess => (Some(500), Some("InternalError")),
            Kind::Garage => (Some(400), Some("InvalidDigest")),
        };
        assert_eq!(failure.status_code(), expected, "{failure}");
        assert_eq!(server.get("c/1"), None);

        server.try_put_with(&client, "c/1", &body).unwrap();
        assert_eq!(proxy.corrupted(), 1);
        assert_eq!(server.get("c/1"), Some(body.clone()));

        // Unsigned payload: only the x-amz-checksum-sha256 can catch the flip.
        let proxy = CorruptingProxy::start(&server.endpoint(), MARKER, 1);
        let client = via(&proxy);
        let r = server.block_on(
            client
                .put_object()
                .bucket(server.bucket())
                .key("c/2")
                .checksum_sha256(sha256_b64(&body))
                .body(ByteStream::from(body.clone()))
                .customize()
                .disable_payload_signing()
                .send(),
        );
        let failure = common::s3::S3Failure::from(&r.unwrap_err());
        assert_eq!(proxy.corrupted(), 1);
        match server.kind() {
            Kind::InProcess => {
                assert_eq!(failure.status_code(), (Some(400), Some("BadDigest")));
                // s3s-fs 0.14 renames the body into place before comparing the checksum.
                assert!(server.get("c/2").is_some_and(|stored| stored != body));
            }
            Kind::Garage => {
                assert_eq!(failure.status_code(), (Some(400), Some("InvalidDigest")));
                assert_eq!(server.get("c/2"), None);
            }
        }
    }

    fn missing_bucket_and_wrong_secret(server: &S3Server) {
        let client = server.client();
        let head = server.try_head_bucket_with(&client, "no-such-bucket").unwrap_err();
        let put = server
            .block_on(
                client
                    .put_object()
                    .bucket("no-such-bucket")
                    .key("x")
                    .body(ByteStream::from_static(b"x"))
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| common::s3::S3Failure::from(&e));
        assert_eq!(head.status_code(), (Some(404), Some("NotFound")), "{head}");
        match server.kind() {
            // s3s-fs 0.14 creates the bucket directory on PutObject.
            Kind::InProcess => assert!(put.is_ok(), "{put:?}"),
            Kind::Garage => {
                let put = put.unwrap_err();
                assert_eq!(put.status_code(), (Some(404), Some("NoSuchBucket")), "{put}");
            }
        }

        let wrong = server.client_with(&server.endpoint(), &server.access_key(), "wrong-secret");
        let head = server.try_head_bucket_with(&wrong, &server.bucket()).unwrap_err();
        let put = server.try_put_with(&wrong, "x", b"x").unwrap_err();
        // A HEAD response has no body, hence no error code.
        assert_eq!(head.status_code(), (Some(403), None), "{head}");
        let code = match server.kind() {
            Kind::InProcess => "SignatureDoesNotMatch",
            Kind::Garage => "AccessDenied",
        };
        assert_eq!(put.status_code(), (Some(403), Some(code)), "{put}");
    }

    fn multipart_uploads_in_progress(server: &S3Server) {
        assert_eq!(server.multipart_uploads(), Vec::<String>::new());
        let client = server.client();
        let bucket = server.bucket();
        let id = server.block_on(async {
            let up = client
                .create_multipart_upload()
                .bucket(&bucket)
                .key("mpu/big")
                .send()
                .await
                .unwrap();
            let id = up.upload_id().unwrap().to_string();
            client
                .upload_part()
                .bucket(&bucket)
                .key("mpu/big")
                .upload_id(&id)
                .part_number(1)
                .body(ByteStream::from(vec![1u8; 1024]))
                .send()
                .await
                .unwrap();
            id
        });
        assert_eq!(server.multipart_uploads(), ["mpu/big"]);
        assert_eq!(server.list("mpu/"), []);
        server
            .block_on(
                client
                    .abort_multipart_upload()
                    .bucket(&bucket)
                    .key("mpu/big")
                    .upload_id(&id)
                    .send(),
            )
            .unwrap();
        assert_eq!(server.multipart_uploads(), Vec::<String>::new());
    }

    fn create_bucket_is_usable(server: &S3Server) {
        server.create_bucket("other");
        let client = server.client();
        server.try_head_bucket_with(&client, "other").unwrap();
        server
            .block_on(
                client
                    .put_object()
                    .bucket("other")
                    .key("k")
                    .body(ByteStream::from_static(b"v"))
                    .send(),
            )
            .unwrap();
        assert_eq!(server.list(""), []);
    }
}

#[test]
fn dest_url_and_env() {
    let server = S3Server::in_process();
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    assert_eq!(
        server.dest_url("media/uploads"),
        format!("s3://media/media/uploads?endpoint={endpoint}&region=us-east-1&path_style=true")
    );
    assert_eq!(
        server.dest_url(""),
        format!("s3://media/?endpoint={endpoint}&region=us-east-1&path_style=true")
    );
    let env = server.env();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("AWS_ACCESS_KEY_ID"), Some(server.access_key()));
    assert_eq!(get("AWS_SECRET_ACCESS_KEY"), Some(server.secret_key()));
    assert_eq!(get("AWS_EC2_METADATA_DISABLED").as_deref(), Some("true"));
    for var in ["AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"] {
        let path = std::path::PathBuf::from(get(var).unwrap());
        assert!(
            path.starts_with(server.dir()) && !path.exists(),
            "{var}={path:?}"
        );
    }
    let mut cmd = common::command();
    server.apply_env(&mut cmd);
    let set: Vec<_> = cmd.get_envs().collect();
    assert!(set.contains(&("AWS_SESSION_TOKEN".as_ref(), None)));
}

#[test]
fn garage_without_binary_panics() {
    if std::env::var_os(common::s3::GARAGE_ENV).is_some() {
        return; // the variable is set: nothing to check here
    }
    let panic = std::panic::catch_unwind(S3Server::garage)
        .err()
        .expect("garage() must panic");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("CUTOVERFS_TEST_GARAGE is not set"),
        "{message}"
    );
}
