//! Where each value of a YAML document sits. serde_yaml forgets positions once a document is
//! deserialized, so errors found afterwards (an unknown identity, a bad CIDR) look their value
//! up here by path to report `line:col`.

use std::fmt;

use saphyr_parser::{Event, Parser, Span};

/// A path into a document, as in `spec.ingress[0].from[1]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct YamlPath(Vec<Segment>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(&'static str),
    Index(usize),
}

impl YamlPath {
    pub(crate) fn key(&self, key: &'static str) -> Self {
        self.with(Segment::Key(key))
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        self.with(Segment::Index(index))
    }

    fn with(&self, segment: Segment) -> Self {
        let mut segments = self.0.clone();
        segments.push(segment);
        Self(segments)
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One-based line and column (in characters) within a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: usize,
    pub col: usize,
}

impl Position {
    pub(crate) const START: Position = Position { line: 1, col: 1 };

    fn of(span: &Span) -> Self {
        Self { line: span.start.line(), col: span.start.col() + 1 }
    }
}

/// The positions of every node of one document.
pub(crate) struct Positions {
    root: Option<Node>,
}

struct Node {
    at: Position,
    children: Children,
}

enum Children {
    None,
    Sequence(Vec<Node>),
    /// Key text (empty for a non-scalar key), key position, value.
    Mapping(Vec<(String, Position, Node)>),
}

impl Positions {
    /// Indexes a document. Text the parser rejects yields an index that answers with the
    /// document start: positions are a diagnostic aid, never a reason to fail.
    pub(crate) fn parse(text: &str) -> Self {
        let mut parser = Parser::new_from_str(text);
        let mut events = std::iter::from_fn(move || parser.next_event()?.ok());
        let root = events.find(|(event, _)| !is_framing(event)).and_then(|first| read_node(&mut events, first));
        Self { root }
    }

    /// Position of the value at `path`, or of its deepest ancestor that exists.
    pub(crate) fn value(&self, path: &YamlPath) -> Position {
        self.walk(path).0
    }

    /// Position of the key that ends `path` (`spec` in `spec:`), or of the deepest ancestor
    /// value when there is no such key.
    pub(crate) fn key(&self, path: &YamlPath) -> Position {
        let (value, key) = self.walk(path);
        key.unwrap_or(value)
    }

    /// The deepest node along `path` and, when the whole path was found and ends in a key, that
    /// key's position.
    fn walk(&self, path: &YamlPath) -> (Position, Option<Position>) {
        let Some(mut node) = self.root.as_ref() else {
            return (Position::START, None);
        };
        let mut last_key = None;
        for segment in &path.0 {
            let child = match (segment, &node.children) {
                (Segment::Key(key), Children::Mapping(entries)) => {
                    entries.iter().find(|(text, _, _)| text == key).map(|(_, key_at, value)| (value, Some(*key_at)))
                }
                (Segment::Index(index), Children::Sequence(items)) => items.get(*index).map(|item| (item, None)),
                _ => None,
            };
            match child {
                Some((child, key_at)) => {
                    node = child;
                    last_key = key_at;
                }
                None => return (node.at, None),
            }
        }
        (node.at, last_key)
    }
}

fn is_framing(event: &Event<'_>) -> bool {
    matches!(event, Event::StreamStart | Event::DocumentStart(_) | Event::Nothing)
}

/// Reads the node that starts with `first`, consuming its events. `None` if the events end
/// early (a syntax error, which serde_yaml reports with its own position).
fn read_node<'a>(events: &mut impl Iterator<Item = (Event<'a>, Span)>, first: (Event<'a>, Span)) -> Option<Node> {
    let (event, span) = first;
    let at = Position::of(&span);
    let children = match event {
        Event::SequenceStart(..) => {
            let mut items = Vec::new();
            loop {
                let next = events.next()?;
                if matches!(next.0, Event::SequenceEnd) {
                    break Children::Sequence(items);
                }
                items.push(read_node(events, next)?);
            }
        }
        Event::MappingStart(..) => {
            let mut entries = Vec::new();
            loop {
                let key = events.next()?;
                if matches!(key.0, Event::MappingEnd) {
                    break Children::Mapping(entries);
                }
                let key_text = match &key.0 {
                    Event::Scalar(text, ..) => text.to_string(),
                    _ => String::new(),
                };
                let key_node = read_node(events, key)?;
                let value = events.next()?;
                entries.push((key_text, key_node.at, read_node(events, value)?));
            }
        }
        _ => Children::None,
    };
    Some(Node { at, children })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
kind: Policy
spec:
  subject: [db]
  ingress:
    - from: [api, web]
      ports:
        - {protocol: tcp, port: 5432}
";

    fn at(line: usize, col: usize) -> Position {
        Position { line, col }
    }

    #[test]
    fn finds_values_and_keys_by_path() {
        let positions = Positions::parse(DOC);
        let spec = YamlPath::default().key("spec");
        let rule = spec.key("ingress").index(0);
        assert_eq!(positions.value(&spec.key("subject").index(0)), at(3, 13));
        assert_eq!(positions.value(&rule.key("from").index(1)), at(5, 19));
        assert_eq!(positions.value(&rule.key("ports").index(0).key("port")), at(7, 33));
        assert_eq!(positions.key(&spec), at(2, 1));
        assert_eq!(positions.key(&rule.key("ports")), at(6, 7));
    }

    #[test]
    fn missing_paths_fall_back_to_the_deepest_ancestor() {
        let positions = Positions::parse(DOC);
        let subject = YamlPath::default().key("spec").key("subject");
        assert_eq!(positions.value(&subject.index(5)), at(3, 12));
        assert_eq!(positions.key(&subject.key("nope")), at(3, 12));
        assert_eq!(Positions::parse("[unclosed").value(&subject), Position::START);
    }

    #[test]
    fn paths_display_like_serde_yaml() {
        let path = YamlPath::default().key("spec").key("ingress").index(0).key("from");
        assert_eq!(path.to_string(), "spec.ingress[0].from");
    }
}
