//! Errors as people read them: an error with the chain of causes under it.

/// `e` and its sources, each said once: one that repeats the words of the one before is
/// left out, and one whose words the one before ends with is too.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let words = cause.to_string();
        if !said.last().is_some_and(|last| last.ends_with(&words)) {
            said.push(words);
        }
        next = cause.source();
    }
    said.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug)]
        struct Said(&'static str, Option<Box<Said>>);
        impl std::fmt::Display for Said {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Said {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|s| s as _)
            }
        }
        let chain = Said(
            "error sending request for url (http://r/v2/)",
            Some(Box::new(Said(
                "error sending request for url (http://r/v2/)",
                Some(Box::new(Said("Connection refused", None))),
            ))),
        );
        assert_eq!(
            causes(&chain),
            "error sending request for url (http://r/v2/): Connection refused"
        );
    }
}
