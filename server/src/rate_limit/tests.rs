use super::*;
use crate::validate::GenerateRequest;

const SEC: Duration = Duration::from_secs(1);

#[test]
fn a_token_bucket_charges_whole_refills_and_takes_refunds() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(600, MINUTE, t0);
    assert_eq!(b.take(500, t0), Ok(()));
    assert_eq!(b.window(t0), Window { limit: 600, remaining: 100, reset: Duration::from_secs(50) });
    // 200 more need 100 more tokens: 10 s at 10 tokens a second.
    assert_eq!(b.take(200, t0), Err(Some(Duration::from_secs(10))));
    assert_eq!(b.take(601, t0), Err(None), "more than it ever holds");
    // A request charged 500 that used 100 gives 400 back.
    b.give(400, t0);
    assert_eq!(b.window(t0).remaining, 500);
    assert_eq!(b.take(200, t0 + 2 * SEC), Ok(()));
    assert_eq!(b.window(t0 + 2 * SEC).remaining, 320);
    // Refills and refunds stop at the capacity.
    b.give(10_000, t0 + 3 * SEC);
    assert_eq!(b.window(t0 + 600 * SEC), Window { limit: 600, remaining: 600, reset: Duration::ZERO });
}

#[test]
fn a_charge_gives_back_what_was_not_generated_when_dropped() {
    let limiter = RateLimiter::new(&[], RateLimitConfig { tpm: 1000, ..Default::default() });
    let caller = limiter.caller(None, None);
    let remaining = |c: &Caller| c.buckets.with_tokens(|b, now| b.window(now).remaining).unwrap_or(0);
    let charge = caller.charge(20, 600).unwrap();
    assert!((380..=381).contains(&remaining(&caller)), "{}", remaining(&caller));
    // A second request of the same size does not fit while the first runs...
    let refused = caller.charge(20, 600).unwrap_err();
    assert!(matches!(&refused, ApiError::RateLimited { retry_after: Some(_), .. }), "{refused:?}");
    charge.record(7);
    drop(charge);
    // ...and does once the first, which generated 7 tokens, has finished.
    assert!((973..=974).contains(&remaining(&caller)), "{}", remaining(&caller));
    assert!(caller.charge(20, 600).is_ok());
    // Larger than the bucket: no point retrying, so no `Retry-After`.
    let too_large = caller.charge(500, 501).unwrap_err();
    assert!(matches!(&too_large, ApiError::RateLimited { retry_after: None, .. }), "{too_large:?}");
}

#[test]
fn tokens_generated_past_the_reservation_are_taken_as_they_come() {
    let limiter = RateLimiter::new(&[], RateLimitConfig { tpm: 1000, ..Default::default() });
    let caller = limiter.caller(None, None);
    // Whole tokens left; negative while the caller is in debt.
    let level = |c: &Caller| c.buckets.with_tokens(|b, now| b.level_now(now)).unwrap_or(0.0).floor() as i64;
    let charge = caller.charge(100, 50).unwrap();
    assert!((850..=851).contains(&level(&caller)), "{}", level(&caller));
    charge.record(30);
    assert!((850..=851).contains(&level(&caller)), "within the reservation: nothing more is taken");
    charge.record(30);
    assert!((840..=841).contains(&level(&caller)), "10 past the reservation: {}", level(&caller));
    for _ in 0..1000 {
        charge.record(1);
    }
    assert!((-160..=-159).contains(&level(&caller)), "past empty: {}", level(&caller));
    drop(charge);
    assert!((-160..=-159).contains(&level(&caller)), "nothing reserved is left to give back");
    // In debt, even a small request waits until the debt has refilled.
    let refused = caller.charge(1, 0).unwrap_err();
    let ApiError::RateLimited { retry_after: Some(wait), .. } = refused else { panic!("{refused:?}") };
    assert!(wait > Duration::from_secs(9), "{wait:?}");
}

#[test]
fn the_requests_bucket_refuses_past_its_limit_with_a_wait() {
    let limiter = RateLimiter::new(&[], RateLimitConfig { rpm: 2, ..Default::default() });
    let caller = limiter.caller(None, None);
    let (first, ok) = caller.take_request();
    assert!(ok.is_ok());
    assert_eq!(first.map(|w| (w.limit, w.remaining)), Some((2, 1)));
    assert!(caller.take_request().1.is_ok());
    let (window, refused) = caller.take_request();
    assert_eq!(window.map(|w| w.remaining), Some(0));
    let Err(ApiError::RateLimited { retry_after: Some(wait), .. }) = refused else { panic!("{refused:?}") };
    assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
}

#[test]
fn keys_have_their_own_buckets_and_defaults() {
    let keys: Vec<ApiKey> = ["sk-a alpha rpm=1 priority=7", "sk-b beta", "sk-c gamma rpm=0"]
        .iter()
        .map(|l| ApiKey::parse_line(l).unwrap().unwrap())
        .collect();
    let limiter = RateLimiter::new(&keys, RateLimitConfig { rpm: 2, ..Default::default() });
    let limit = |k: usize| limiter.caller(Some(KeyIndex(k)), None).take_request().0.map(|w| w.limit);
    assert_eq!((limit(0), limit(1), limit(2)), (Some(1), Some(2), None));
    // Each key has its own bucket: alpha's is empty now, beta's is not.
    assert!(limiter.caller(Some(KeyIndex(0)), None).take_request().1.is_err());
    assert!(limiter.caller(Some(KeyIndex(1)), None).take_request().1.is_ok());
    // And clients without a key have theirs.
    assert!(limiter.caller(None, None).take_request().1.is_ok());
}

#[test]
fn a_keys_priority_applies_when_the_request_sets_none() {
    let keys = [ApiKey::parse_line("sk-batch batch priority=5").unwrap().unwrap(), ApiKey::new("sk-plain")];
    let limiter = RateLimiter::new(&keys, RateLimitConfig::default());
    let request = |json: serde_json::Value| {
        let wire: crate::openai::ChatCompletionRequest = serde_json::from_value(json).unwrap();
        GenerateRequest::try_from(wire).unwrap()
    };
    let without = request(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));
    let with = request(serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "priority": -1}));
    let batch = limiter.caller(Some(KeyIndex(0)), None);
    assert_eq!((batch.priority(without.priority), batch.priority(with.priority)), (5, -1));
    let plain = limiter.caller(Some(KeyIndex(1)), None);
    assert_eq!((plain.priority(without.priority), plain.priority(with.priority)), (0, -1));
    assert_eq!(limiter.caller(None, None).priority(without.priority), 0);
}

#[test]
fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    let peer: IpAddr = "10.0.0.9".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 203.0.113.7"));
    assert_eq!(client_addr(&headers, Some(peer), false), Some(peer), "a client can write any header");
    assert_eq!(client_addr(&headers, Some(peer), true), "203.0.113.7".parse().ok(), "the proxy's entry is the last");
    headers.append("x-forwarded-for", HeaderValue::from_static("[2001:db8::1]:4711"));
    assert_eq!(client_addr(&headers, Some(peer), true), "2001:db8::1".parse().ok());
    headers.insert("x-forwarded-for", HeaderValue::from_static("not an address"));
    assert_eq!(client_addr(&headers, Some(peer), true), Some(peer));
    assert_eq!(client_addr(&HeaderMap::new(), None, true), None, "no connection info: unknown client");
}

#[test]
fn each_client_address_has_its_own_bucket() {
    let limiter = RateLimiter::new(&[], RateLimitConfig { rpm: 1, ..Default::default() });
    let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    assert!(limiter.caller(None, Some(a)).take_request().1.is_ok());
    assert!(limiter.caller(None, Some(a)).take_request().1.is_err());
    assert!(limiter.caller(None, Some(b)).take_request().1.is_ok());
    assert!(limiter.caller(None, None).take_request().1.is_ok());
    assert_eq!(limiter.clients.len(), 3);
    // IPv6 clients are their /64: another address of the same /64 shares the bucket.
    let (c, d, e): (IpAddr, IpAddr, IpAddr) =
        ("2001:db8::1".parse().unwrap(), "2001:db8::ffff:2".parse().unwrap(), "2001:db8:0:1::1".parse().unwrap());
    assert!(limiter.caller(None, Some(c)).take_request().1.is_ok());
    assert!(limiter.caller(None, Some(d)).take_request().1.is_err());
    assert!(limiter.caller(None, Some(e)).take_request().1.is_ok());
}

#[test]
fn with_no_limits_nothing_is_tracked() {
    let limiter = RateLimiter::new(&[ApiKey::new("sk-x")], RateLimitConfig::default());
    for caller in [limiter.caller(None, "192.0.2.1".parse().ok()), limiter.caller(Some(KeyIndex(0)), None)] {
        assert!(matches!(caller.take_request(), (None, Ok(()))));
        let charge = caller.charge(100, 100_000).unwrap();
        assert!(charge.0.is_none());
        let mut headers = HeaderMap::new();
        caller.write_headers(&mut headers, None);
        assert!(headers.is_empty());
    }
    assert!(limiter.clients.is_empty());
}

#[test]
fn resets_are_written_as_openai_writes_them() {
    let cases = [(Duration::from_micros(1), "1ms"), (Duration::from_millis(250), "250ms"), (SEC, "1s")];
    for (d, s) in cases.into_iter().chain([(Duration::from_millis(12_400), "13s"), (Duration::from_secs(360), "6m0s")])
    {
        assert_eq!(format_reset(d), s);
    }
}

#[test]
fn client_buckets_are_bounded_and_idle_ones_evicted() {
    let mut limiter = RateLimiter::new(&[], RateLimitConfig { rpm: 10, ..Default::default() });
    let addr = |i: usize| Some(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]));
    // Callers held: their requests are in flight, so their buckets must stay.
    let held: Vec<Caller> = (0..MAX_CLIENTS).map(|i| limiter.caller(None, addr(i))).collect();
    assert_eq!(limiter.clients.len(), MAX_CLIENTS);
    let newcomer = limiter.caller(None, addr(MAX_CLIENTS));
    assert!(Arc::ptr_eq(&newcomer.buckets, &limiter.overflow), "a full map shares the overflow bucket");
    assert_eq!(limiter.clients.len(), MAX_CLIENTS);
    drop((held, newcomer));
    // A minute later every bucket is full again and unshared: all are dropped for the new client.
    limiter.epoch = Instant::now().checked_sub(MINUTE + SEC).expect("an uptime over a minute");
    let later = limiter.caller(None, addr(MAX_CLIENTS + 1));
    assert!(!Arc::ptr_eq(&later.buckets, &limiter.overflow));
    assert_eq!(limiter.clients.len(), 1);
}
