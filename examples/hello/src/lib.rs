//! `hello`: answers every request with a greeting, and logs one line per request to stdout
//! so that `shoal logs` has something to show.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        println!("hello: {} {path}", method_name(&request.method()));

        // The greeting is configurable so that a changed `[env]` is visible as a new revision.
        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello from Shoal!".into());
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .expect("content-type is a valid header");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("the body is taken once");
        // Headers go out first; the body follows as a stream.
        ResponseOutparam::set(response_out, Ok(response));

        let mut stream = body.write().expect("the stream is taken once");
        let written = stream
            .write_all(format!("{greeting}\n").as_bytes())
            .and_then(|()| stream.blocking_flush().map_err(std::io::Error::other));
        drop(stream);
        match written {
            Ok(()) => OutgoingBody::finish(body, None).expect("the body has no declared length"),
            // Dropping an unfinished body tells the host the response was cut short.
            Err(e) => eprintln!("hello: writing the response: {e}"),
        }
    }
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}
