//! Identity selectors besides CIDRs — cgroup paths, SPIFFE IDs and host-side interfaces — and the
//! matchers the agent asks which identity a cgroup or a SPIFFE ID belongs to.
//!
//! CIDRs are resolved by the kernel (the ipcache); these are resolved by the agent on the node,
//! which then binds the cgroup id, or the addresses or cgroup of a workload presenting a
//! certificate, or the interface, to the identity's number.
//!
//! Patterns (cgroup globs and SPIFFE patterns) are `/`-separated segments. A segment `**`
//! matches zero or more whole segments; any other segment matches exactly one segment, where
//! `*` matches any run of characters except `/`. Cgroup globs also take `?`, `[abc]`, `[!abc]`
//! and `{a,b}` within a segment (globset syntax, with `\` a literal character: systemd escapes
//! unit names with it, as in `system-systemd\x2dfsck.slice`).
//!
//! When several selectors of one kind match, the most specific wins: an exact selector beats
//! every pattern; among patterns, the one with more literal segments (segments without any
//! wildcard) wins, then the one with more literal characters (outside wildcards, classes and
//! alternations); a remaining tie goes to the identity whose name sorts first (bytewise).

use std::{cmp::Reverse, collections::BTreeMap, fmt};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// The longest cgroup directory name (NAME_MAX).
const MAX_CGROUP_NAME: usize = 255;
/// The longest cgroup path (PATH_MAX).
const MAX_CGROUP_PATH: usize = 4096;
/// The longest SPIFFE ID, in bytes, as the SPIFFE standard bounds it.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain, in bytes, as the SPIFFE standard bounds it.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The longest Linux interface name, in bytes (IFNAMSIZ less the terminating NUL).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

const SPIFFE_SCHEME: &str = "spiffe://";
const CGROUP_EXAMPLE: &str = "system.slice/postgresql.service";
const SPIFFE_EXAMPLE: &str = "spiffe://prod.example/ns/shop/sa/api";

/// A `cgroup:` selector: a path relative to the cgroup v2 root, or a glob over such paths.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CgroupSelector {
    /// Exactly this cgroup.
    Exact(String),
    /// Every cgroup whose path the glob matches.
    Glob(String),
}

impl CgroupSelector {
    /// Validates a selector's text; the error says what is wrong and how to fix it.
    pub fn parse(text: &str) -> Result<Self, String> {
        check_cgroup_path(text)?;
        if !text.contains(['*', '?', '[', '{']) {
            return Ok(Self::Exact(text.to_owned()));
        }
        check_segments_of_glob(text, "cgroup glob")?;
        build_glob(text).map_err(|err| format!("invalid cgroup glob \"{text}\": {}", err.kind()))?;
        Ok(Self::Glob(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Glob(text) => text,
        }
    }

    pub fn is_glob(&self) -> bool {
        matches!(self, Self::Glob(_))
    }

    /// Segments without any wildcard: the specificity of a glob.
    pub fn literal_segments(&self) -> usize {
        literal_segments(self.as_str(), &['*', '?', '[', ']', '{', '}'])
    }

    /// Characters outside `*`, `?`, `[...]` and `{...}`: the specificity of a glob among those
    /// with as many literal segments.
    pub fn literal_chars(&self) -> usize {
        let (mut count, mut class, mut braces) = (0, false, 0usize);
        let mut chars = self.as_str().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                ']' if class => class = false,
                _ if class => {}
                '[' => {
                    class = true;
                    chars.next_if_eq(&'!');
                    chars.next_if_eq(&']');
                }
                '{' => braces += 1,
                '}' => braces = braces.saturating_sub(1),
                '*' | '?' => {}
                _ if braces == 0 => count += 1,
                _ => {}
            }
        }
        count
    }
}

impl fmt::Display for CgroupSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `spiffe:` selector: one SPIFFE ID, or a pattern over the IDs of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffeSelector {
    /// Exactly this SPIFFE ID.
    Exact(String),
    /// `*` within a path segment, `**` for any number of segments; the trust domain is exact.
    Pattern(String),
}

impl SpiffeSelector {
    /// Validates a selector's text; the error says what is wrong and how to fix it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !check_spiffe(text, true)? {
            return Ok(Self::Exact(text.to_owned()));
        }
        build_glob(text).map_err(|err| format!("invalid SPIFFE pattern \"{text}\": {}", err.kind()))?;
        Ok(Self::Pattern(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Pattern(text) => text,
        }
    }

    pub fn is_pattern(&self) -> bool {
        matches!(self, Self::Pattern(_))
    }

    /// Path segments without `*`: the specificity of a pattern.
    pub fn literal_segments(&self) -> usize {
        let path = spiffe_path(self.as_str());
        literal_segments(path.strip_prefix('/').unwrap_or(path), &['*'])
    }

    /// Characters other than `*`: the specificity of a pattern among those with as many literal
    /// segments.
    pub fn literal_chars(&self) -> usize {
        self.as_str().chars().filter(|&c| c != '*').count()
    }
}

impl fmt::Display for SpiffeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `id` is a SPIFFE ID that selectors can match: `spiffe://TRUST-DOMAIN/PATH`, the
/// trust domain `[a-z0-9.-]+` (at most 255 bytes), path segments `[A-Za-z0-9._-]+` other than `.` and `..`, no
/// query or fragment, at most 2048 bytes. For the certificate source, to check a URI SAN.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    check_spiffe(id, false).map(|_| ())
}

/// Whether `name` is a valid Linux interface name (the kernel's `dev_valid_name`): 1 to 15
/// bytes, not `.` or `..`, without `/`, `:` or whitespace (nor, here, control characters).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty; write the workload's host-side interface, e.g. lxc-api".to_owned());
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "interface name \"{name}\" is {} bytes long; Linux interface names have at most {MAX_INTERFACE_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("\"{name}\" is not a valid interface name; write the interface's name, e.g. lxc-api"));
    }
    if let Some(bad) = name.chars().find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} is not allowed in an interface name (\"{}\"); Linux interface names have no '/', ':' or whitespace",
            describe_char(bad),
            name.escape_debug()
        ));
    }
    Ok(())
}

fn describe_char(c: char) -> String {
    if c.is_whitespace() || c.is_control() {
        format!("{:?}", c)
    } else {
        format!("'{c}'")
    }
}

/// The checks every cgroup selector passes, glob or not.
fn check_cgroup_path(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!(
            "cgroup selector is empty; write a path relative to the cgroup v2 root, e.g. {CGROUP_EXAMPLE}"
        ));
    }
    if text.starts_with('/') {
        let relative = ["/sys/fs/cgroup/unified/", "/sys/fs/cgroup/"]
            .iter()
            .find_map(|mount| text.strip_prefix(mount))
            .unwrap_or(text)
            .trim_start_matches('/');
        let hint = match relative {
            "" => format!("e.g. {CGROUP_EXAMPLE}"),
            _ => format!("did you mean \"{relative}\"?"),
        };
        return Err(format!(
            "cgroup path \"{text}\" is absolute; write it relative to the cgroup v2 root (no leading '/'), {hint}"
        ));
    }
    if text.len() > MAX_CGROUP_PATH {
        return Err(format!("cgroup path is {} bytes long; use at most {MAX_CGROUP_PATH}", text.len()));
    }
    if let Some(bad) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "cgroup path \"{}\" contains the control character {bad:?}; remove it",
            text.escape_debug()
        ));
    }
    for segment in text.split('/') {
        match segment {
            "" if text.ends_with('/') => {
                return Err(format!("cgroup path \"{text}\" ends with '/'; remove the trailing '/'"))
            }
            "" => return Err(format!("cgroup path \"{text}\" has an empty segment (\"//\"); remove the extra '/'")),
            "." | ".." => {
                return Err(format!(
                    "cgroup path \"{text}\" has a \"{segment}\" segment; write the path from the root without \".\" or \"..\""
                ))
            }
            _ if segment.len() > MAX_CGROUP_NAME => {
                return Err(format!(
                    "cgroup path \"{text}\" has a segment of {} bytes; a cgroup name has at most {MAX_CGROUP_NAME}",
                    segment.len()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A pattern's segments must stay segments: `**` alone in its segment, and no `/` inside a
/// `[...]` class or a `{...}` alternation (each segment matches within one path segment).
fn check_segments_of_glob(text: &str, what: &str) -> Result<(), String> {
    for segment in text.split('/') {
        if segment.contains("**") && segment != "**" {
            return Err(format!(
                "{what} \"{text}\" has \"**\" inside the segment \"{segment}\"; \"**\" must be a whole segment \
                 (as in kubepods.slice/**/x.scope), use \"*\" to match within a segment"
            ));
        }
    }
    let (mut in_class, mut braces) = (false, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ']' if in_class => in_class = false,
            '[' if !in_class => {
                in_class = true;
                // `[!]...]` and `[]...]`: a `]` right after the opening is a literal.
                chars.next_if_eq(&'!');
                chars.next_if_eq(&']');
            }
            '{' if !in_class => braces += 1,
            '}' if !in_class => braces = braces.saturating_sub(1),
            '/' if in_class || braces > 0 => {
                return Err(format!(
                    "{what} \"{text}\" has a '/' inside [...] or {{...}}; a segment matches within one path \
                     segment, write one selector per alternative"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// `true` when `text` is a pattern (patterns allowed), `false` for an exact ID.
fn check_spiffe(text: &str, patterns: bool) -> Result<bool, String> {
    let form = format!("write {SPIFFE_SCHEME}TRUST-DOMAIN/PATH, e.g. {SPIFFE_EXAMPLE}");
    if text.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!("SPIFFE ID is {} bytes long; use at most {MAX_SPIFFE_ID_LEN}", text.len()));
    }
    let Some(rest) = text.strip_prefix(SPIFFE_SCHEME) else {
        let upper_scheme = text.get(..SPIFFE_SCHEME.len()).is_some_and(|s| s.eq_ignore_ascii_case(SPIFFE_SCHEME));
        return Err(match upper_scheme {
            true => format!("SPIFFE ID \"{text}\" must start with lowercase \"{SPIFFE_SCHEME}\""),
            false => format!("SPIFFE ID \"{text}\" must start with \"{SPIFFE_SCHEME}\"; {form}"),
        });
    };
    if let Some(at) = rest.find(['?', '#']) {
        let part = if rest[at..].starts_with('?') { "query" } else { "fragment" };
        return Err(format!(
            "SPIFFE ID \"{text}\" has a {part} (\"{}\"); SPIFFE IDs have none, remove it",
            &rest[at..]
        ));
    }
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if domain.is_empty() {
        return Err(format!("SPIFFE ID \"{text}\" has no trust domain; {form}"));
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "the trust domain of SPIFFE ID \"{text}\" is {} bytes long; use at most {MAX_TRUST_DOMAIN_LEN}",
            domain.len()
        ));
    }
    // The SPIFFE ID spec's trust-domain alphabet, as `svid::validate_spiffe_id` checks it.
    let domain_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if let Some(bad) = domain.chars().find(|&c| !domain_char(c)) {
        let fix = match bad {
            'A'..='Z' => format!("write it in lowercase: \"{}\"", domain.to_ascii_lowercase()),
            '*' => "the trust domain is always exact, only the path can be a pattern".to_owned(),
            ':' => "SPIFFE IDs have no port".to_owned(),
            '@' => "SPIFFE IDs have no user info".to_owned(),
            _ => "use lowercase letters, digits, '.', '-' and '_'".to_owned(),
        };
        return Err(format!(
            "{} is not allowed in the trust domain \"{}\" of SPIFFE ID \"{}\"; {fix}",
            describe_char(bad),
            domain.escape_debug(),
            text.escape_debug()
        ));
    }
    if path.is_empty() || path == "/" {
        return Err(format!(
            "SPIFFE ID \"{text}\" has no path; a workload's ID names it below the trust domain, {form}"
        ));
    }
    let mut pattern = false;
    for segment in path[1..].split('/') {
        match segment {
            "" if path.ends_with('/') => {
                return Err(format!("SPIFFE ID \"{text}\" ends with '/'; remove the trailing '/'"))
            }
            "" => return Err(format!("SPIFFE ID \"{text}\" has an empty path segment (\"//\"); remove the extra '/'")),
            "." | ".." => {
                return Err(format!(
                    "SPIFFE ID \"{text}\" has a \"{segment}\" path segment, which SPIFFE IDs do not allow; remove it"
                ))
            }
            _ => {}
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (patterns && c == '*');
        if let Some(bad) = segment.chars().find(|&c| !allowed(c)) {
            let hint = if patterns {
                "use letters, digits, '.', '_' and '-' (and '*' in patterns)"
            } else {
                "use letters, digits, '.', '_' and '-'"
            };
            let encoded = if bad == '%' { " (SPIFFE IDs are never percent-encoded)" } else { "" };
            return Err(format!(
                "{} is not allowed in the path of SPIFFE ID \"{}\"{encoded}; {hint}",
                describe_char(bad),
                text.escape_debug()
            ));
        }
        if segment.contains('*') {
            pattern = true;
            if segment.contains("**") && segment != "**" {
                return Err(format!(
                    "SPIFFE pattern \"{text}\" has \"**\" inside the segment \"{segment}\"; \"**\" must be a whole \
                     segment (as in spiffe://td/ns/**), use \"*\" to match within a segment"
                ));
            }
        }
    }
    Ok(pattern)
}

/// The path of a valid SPIFFE ID or pattern: from the `/` after the trust domain.
fn spiffe_path(text: &str) -> &str {
    let rest = text.strip_prefix(SPIFFE_SCHEME).unwrap_or(text);
    rest.find('/').map_or("", |at| &rest[at..])
}

fn literal_segments(path: &str, wildcards: &[char]) -> usize {
    path.split('/').filter(|segment| !segment.contains(wildcards)).count()
}

/// The one glob dialect of selectors: `*` never crosses `/`, `\` is a literal character.
fn build_glob(pattern: &str) -> Result<Glob, globset::Error> {
    let glob = GlobBuilder::new(pattern).literal_separator(true).backslash_escape(false).build()?;
    // Parsing checks the syntax; compiling checks what only the regex engine can (its size).
    glob.compile_matcher();
    Ok(glob)
}

/// Exact strings and globs to identities, most specific first.
#[derive(Clone, Debug, Default)]
struct PathMatcher {
    exact: BTreeMap<String, u32>,
    /// In precedence order: more literal segments first, then more literal characters, then
    /// identity name, then pattern.
    globs: Vec<GlobEntry>,
    /// `globs`, compiled; index `i` is `globs[i]`.
    set: GlobSet,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GlobEntry {
    pattern: String,
    literal_segments: usize,
    literal_chars: usize,
    identity: String,
    id: u32,
}

impl PartialEq for PathMatcher {
    /// `set` is compiled from `globs`.
    fn eq(&self, other: &Self) -> bool {
        self.exact == other.exact && self.globs == other.globs
    }
}

impl Eq for PathMatcher {}

/// What the matcher needs of a cgroup or SPIFFE selector.
trait PathSelector {
    fn text(&self) -> &str;
    fn is_glob(&self) -> bool;
    fn literal_segments(&self) -> usize;
    fn literal_chars(&self) -> usize;
}

impl PathSelector for CgroupSelector {
    fn text(&self) -> &str {
        self.as_str()
    }
    fn is_glob(&self) -> bool {
        CgroupSelector::is_glob(self)
    }
    fn literal_segments(&self) -> usize {
        CgroupSelector::literal_segments(self)
    }
    fn literal_chars(&self) -> usize {
        CgroupSelector::literal_chars(self)
    }
}

impl PathSelector for SpiffeSelector {
    fn text(&self) -> &str {
        self.as_str()
    }
    fn is_glob(&self) -> bool {
        self.is_pattern()
    }
    fn literal_segments(&self) -> usize {
        SpiffeSelector::literal_segments(self)
    }
    fn literal_chars(&self) -> usize {
        SpiffeSelector::literal_chars(self)
    }
}

impl PathMatcher {
    fn from_selectors<'a, S: PathSelector + 'a>(
        selectors: impl IntoIterator<Item = (&'a S, &'a str, u32)>,
    ) -> Result<Self, globset::Error> {
        let (mut exact, mut globs) = (BTreeMap::new(), Vec::new());
        for (selector, identity, id) in selectors {
            if selector.is_glob() {
                globs.push(GlobEntry {
                    pattern: selector.text().to_owned(),
                    literal_segments: selector.literal_segments(),
                    literal_chars: selector.literal_chars(),
                    identity: identity.to_owned(),
                    id,
                });
            } else {
                exact.insert(selector.text().to_owned(), id);
            }
        }
        Self::new(exact, globs)
    }

    fn new(exact: BTreeMap<String, u32>, mut globs: Vec<GlobEntry>) -> Result<Self, globset::Error> {
        let precedence = |g: &GlobEntry| (Reverse(g.literal_segments), Reverse(g.literal_chars), g.identity.clone());
        globs.sort_by(|a, b| precedence(a).cmp(&precedence(b)).then_with(|| a.pattern.cmp(&b.pattern)));
        let mut set = GlobSetBuilder::new();
        for entry in &globs {
            set.add(build_glob(&entry.pattern)?);
        }
        Ok(Self { exact, globs, set: set.build()? })
    }

    /// The identity of the most specific selector matching `text` itself.
    fn lookup(&self, text: &str) -> Option<u32> {
        if let Some(id) = self.exact.get(text) {
            return Some(*id);
        }
        if self.globs.is_empty() {
            return None;
        }
        self.set.matches(text).into_iter().min().map(|index| self.globs[index].id)
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.globs.is_empty()
    }
}

/// Which identity a cgroup belongs to, from the `cgroup:` selectors of a policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupMatcher(PathMatcher);

impl CgroupMatcher {
    /// Builds the matcher from (selector, identity name, identity number) triples.
    pub(crate) fn new<'a>(
        selectors: impl IntoIterator<Item = (&'a CgroupSelector, &'a str, u32)>,
    ) -> Result<Self, globset::Error> {
        PathMatcher::from_selectors(selectors).map(Self)
    }

    /// The identity of the cgroup at `relative_path` (relative to the cgroup v2 root, e.g.
    /// `system.slice/postgresql.service`; leading and trailing `/` are ignored).
    ///
    /// The path itself is tried first: an exact selector, else the most specific matching glob.
    /// A cgroup that matches nothing inherits from its nearest ancestor that does, so
    /// `system.slice/postgresql.service/child` belongs to whoever selects
    /// `system.slice/postgresql.service`. The root cgroup (an empty path) and paths with empty,
    /// `.` or `..` segments belong to no identity.
    pub fn identity_of(&self, relative_path: &str) -> Option<u32> {
        let path = relative_path.trim_matches('/');
        if self.0.is_empty() || path.is_empty() || path.split('/').any(|s| matches!(s, "" | "." | "..")) {
            return None;
        }
        let mut candidate = path;
        loop {
            if let Some(id) = self.0.lookup(candidate) {
                return Some(id);
            }
            candidate = candidate.rsplit_once('/')?.0;
        }
    }

    /// Whether the policy set has no cgroup selector (no cgroup needs to be looked at).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which identity a SPIFFE ID belongs to, from the `spiffe:` selectors of a policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpiffeMatcher(PathMatcher);

impl SpiffeMatcher {
    /// Builds the matcher from (selector, identity name, identity number) triples.
    pub(crate) fn new<'a>(
        selectors: impl IntoIterator<Item = (&'a SpiffeSelector, &'a str, u32)>,
    ) -> Result<Self, globset::Error> {
        PathMatcher::from_selectors(selectors).map(Self)
    }

    /// The identity of the workload presenting `spiffe_id`: an exact selector, else the most
    /// specific matching pattern. An ID that is not a valid SPIFFE ID (see [`check_spiffe_id`])
    /// belongs to no identity, whatever the patterns.
    pub fn identity_of(&self, spiffe_id: &str) -> Option<u32> {
        if self.0.is_empty() || check_spiffe_id(spiffe_id).is_err() {
            return None;
        }
        self.0.lookup(spiffe_id)
    }

    /// Whether the policy set has no SPIFFE selector.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup_error(text: &str) -> String {
        CgroupSelector::parse(text).expect_err(text)
    }

    fn spiffe_error(text: &str) -> String {
        SpiffeSelector::parse(text).expect_err(text)
    }

    fn cgroups(selectors: &[(&str, &str, u32)]) -> CgroupMatcher {
        let parsed: Vec<_> =
            selectors.iter().map(|(text, name, id)| (CgroupSelector::parse(text).unwrap(), *name, *id)).collect();
        CgroupMatcher::new(parsed.iter().map(|(selector, name, id)| (selector, *name, *id))).unwrap()
    }

    fn spiffes(selectors: &[(&str, &str, u32)]) -> SpiffeMatcher {
        let parsed: Vec<_> =
            selectors.iter().map(|(text, name, id)| (SpiffeSelector::parse(text).unwrap(), *name, *id)).collect();
        SpiffeMatcher::new(parsed.iter().map(|(selector, name, id)| (selector, *name, *id))).unwrap()
    }

    #[test]
    fn cgroup_selectors_are_exact_or_globs() {
        let exact = CgroupSelector::parse("system.slice/postgresql.service").unwrap();
        assert_eq!(exact, CgroupSelector::Exact("system.slice/postgresql.service".into()));
        assert!(!exact.is_glob());
        assert_eq!(exact.literal_segments(), 2);
        // systemd's escapes keep their backslash: it is a literal character, not an escape.
        let escaped = CgroupSelector::parse(r"system.slice/system-systemd\x2dfsck.slice").unwrap();
        assert!(!escaped.is_glob());
        for glob in [
            "kubepods.slice/**/cri-containerd-*.scope",
            "**/docker-*.scope",
            "user.slice/**",
            "*",
            "**",
            "a/b?/[0-9]*/{x,y}.scope",
            r"system.slice/system-systemd\x2d*.slice",
        ] {
            let selector = CgroupSelector::parse(glob).unwrap();
            assert_eq!(selector, CgroupSelector::Glob(glob.into()), "{glob}");
        }
        assert_eq!(CgroupSelector::parse("kubepods.slice/**/cri-containerd-*.scope").unwrap().literal_segments(), 1);
        assert_eq!(CgroupSelector::parse("a/b/c/*").unwrap().literal_segments(), 3);
        assert_eq!(CgroupSelector::parse("a/{b,c}/[d]").unwrap().literal_segments(), 1);
        assert_eq!(CgroupSelector::parse("a/{b,c}/[!]x]?/y*z").unwrap().literal_chars(), 6);
    }

    #[test]
    fn cgroup_selectors_must_be_relative_canonical_globs() {
        assert_eq!(
            cgroup_error("/sys/fs/cgroup/system.slice/x.service"),
            "cgroup path \"/sys/fs/cgroup/system.slice/x.service\" is absolute; write it relative to the cgroup v2 \
             root (no leading '/'), did you mean \"system.slice/x.service\"?"
        );
        assert!(cgroup_error("/").contains("is absolute"), "{}", cgroup_error("/"));
        assert!(cgroup_error("").starts_with("cgroup selector is empty;"));
        assert_eq!(cgroup_error("a//b"), "cgroup path \"a//b\" has an empty segment (\"//\"); remove the extra '/'");
        assert_eq!(cgroup_error("a/b/"), "cgroup path \"a/b/\" ends with '/'; remove the trailing '/'");
        assert_eq!(
            cgroup_error("a/../b"),
            "cgroup path \"a/../b\" has a \"..\" segment; write the path from the root without \".\" or \"..\""
        );
        assert!(cgroup_error("./a").contains("has a \".\" segment"));
        assert!(cgroup_error("a\nb").contains("control character '\\n'"));
        assert!(cgroup_error(&format!("a/{}", "x".repeat(256))).contains("a segment of 256 bytes"));
        assert_eq!(CgroupSelector::parse(&format!("a/{}", "x".repeat(255))).map(|s| s.is_glob()), Ok(false));
        assert!(cgroup_error(&"abcdefg/".repeat(600)).contains("use at most 4096"));
        assert!(cgroup_error("a/b**/c").contains("\"**\" must be a whole segment"));
        assert!(cgroup_error("a/***").contains("\"**\" must be a whole segment"));
        assert!(cgroup_error("a/{b/c,d}").contains("'/' inside [...] or {...}"));
        assert!(cgroup_error("a/[/]").contains("'/' inside [...] or {...}"));
        assert_eq!(cgroup_error("a/[bc"), "invalid cgroup glob \"a/[bc\": unclosed character class; missing ']'");
        assert!(cgroup_error("a/{b,c").starts_with("invalid cgroup glob \"a/{b,c\": unclosed alternate group"));
        assert!(cgroup_error("a/[z-a]").starts_with("invalid cgroup glob \"a/[z-a]\": invalid range"));
    }

    #[test]
    fn exact_cgroups_beat_globs_and_globs_with_more_literal_segments_win() {
        let matcher = cgroups(&[
            ("kubepods.slice/**", "k-any", 1),
            ("kubepods.slice/**/cri-containerd-*.scope", "k-containers", 2),
            ("kubepods.slice/pod1.slice/cri-containerd-*.scope", "k-pod1", 3),
            ("kubepods.slice/pod1.slice/cri-containerd-abc.scope", "k-abc", 4),
        ]);
        assert_eq!(matcher.identity_of("kubepods.slice/pod1.slice/cri-containerd-abc.scope"), Some(4));
        assert_eq!(matcher.identity_of("kubepods.slice/pod1.slice/cri-containerd-def.scope"), Some(3));
        // One literal segment each, but more literal characters than "kubepods.slice/**".
        assert_eq!(matcher.identity_of("kubepods.slice/pod2.slice/cri-containerd-def.scope"), Some(2));
        // `/**/` matches zero segments too.
        assert_eq!(matcher.identity_of("kubepods.slice/cri-containerd-def.scope"), Some(2));
        assert_eq!(matcher.identity_of("kubepods.slice/pod2.slice"), Some(1));
        // `a/**` matches below `a`, not `a` itself.
        assert_eq!(matcher.identity_of("kubepods.slice"), None);
        assert_eq!(matcher.identity_of("system.slice"), None);
    }

    #[test]
    fn glob_ties_go_to_the_first_identity_name() {
        // One literal segment and three literal characters each; "alpha" sorts before "beta",
        // whatever the input order.
        for order in [[("*/b", "beta", 2), ("a/*", "alpha", 1)], [("a/*", "alpha", 1), ("*/b", "beta", 2)]] {
            let matcher = cgroups(&order);
            assert_eq!(matcher.identity_of("a/b"), Some(1));
            assert_eq!(matcher.identity_of("x/b"), Some(2));
            assert_eq!(matcher.identity_of("a/x"), Some(1));
        }
    }

    #[test]
    fn star_stays_within_a_segment_and_double_star_spans_segments() {
        let matcher = cgroups(&[("system.slice/*.service", "services", 1), ("**/leaf-*", "leaves", 2)]);
        assert_eq!(matcher.identity_of("system.slice/postgresql.service"), Some(1));
        // `*` does not cross `/`: `nested/x.service` is not one segment; its ancestors match
        // nothing either.
        assert_eq!(matcher.identity_of("system.slice/nested/x.service"), None);
        assert_eq!(matcher.identity_of("leaf-1"), Some(2));
        assert_eq!(matcher.identity_of("a/b/c/leaf-1"), Some(2));
        assert_eq!(matcher.identity_of("a/b/c/leaf"), None);
    }

    #[test]
    fn cgroups_inherit_their_nearest_matching_ancestor() {
        let matcher = cgroups(&[
            ("system.slice", "system", 1),
            ("system.slice/postgresql.service", "postgres", 2),
            ("user.slice/*/app-*.scope", "apps", 3),
        ]);
        assert_eq!(matcher.identity_of("system.slice/postgresql.service"), Some(2));
        assert_eq!(matcher.identity_of("system.slice/postgresql.service/child"), Some(2));
        assert_eq!(matcher.identity_of("system.slice/postgresql.service/a/b/c"), Some(2));
        assert_eq!(matcher.identity_of("system.slice/nginx.service/worker"), Some(1));
        assert_eq!(matcher.identity_of("user.slice/user-1000.slice/app-x.scope/sub"), Some(3));
        assert_eq!(matcher.identity_of("user.slice/user-1000.slice"), None);
        // Leading and trailing slashes are ignored; the root and odd paths match nothing.
        assert_eq!(matcher.identity_of("/system.slice/postgresql.service/"), Some(2));
        assert_eq!(matcher.identity_of(""), None);
        assert_eq!(matcher.identity_of("/"), None);
        assert_eq!(matcher.identity_of("system.slice/../system.slice"), None);
        assert_eq!(matcher.identity_of("system.slice//x"), None);
        // A glob that matches the path itself is nearer than an exact ancestor.
        let matcher = cgroups(&[("a", "parent", 1), ("a/*", "children", 2)]);
        assert_eq!(matcher.identity_of("a/b/c"), Some(2));
        assert_eq!(matcher.identity_of("a"), Some(1));
        assert!(!matcher.is_empty());
        assert!(CgroupMatcher::default().is_empty());
        assert_eq!(CgroupMatcher::default().identity_of("a"), None);
    }

    #[test]
    fn spiffe_selectors_are_ids_or_patterns() {
        let exact = SpiffeSelector::parse("spiffe://prod.example/ns/shop/sa/api").unwrap();
        assert_eq!(exact, SpiffeSelector::Exact("spiffe://prod.example/ns/shop/sa/api".into()));
        assert_eq!(exact.literal_segments(), 4);
        for pattern in ["spiffe://prod.example/ns/shop/sa/*", "spiffe://td/**", "spiffe://td/ns/*/sa/api-*"] {
            assert_eq!(SpiffeSelector::parse(pattern), Ok(SpiffeSelector::Pattern(pattern.into())));
        }
        assert_eq!(SpiffeSelector::parse("spiffe://td/ns/*/sa/api-*").unwrap().literal_segments(), 2);
        assert_eq!(check_spiffe_id("spiffe://a-b.c0/A_z.0-9"), Ok(()));
        assert!(check_spiffe_id("spiffe://td/ns/*").unwrap_err().contains("'*' is not allowed"));
    }

    #[test]
    fn spiffe_selectors_are_validated() {
        let cases = [
            ("prod.example/ns/a", "SPIFFE ID \"prod.example/ns/a\" must start with \"spiffe://\"; write spiffe://TRUST-DOMAIN/PATH, e.g. spiffe://prod.example/ns/shop/sa/api"),
            ("SPIFFE://td/a", "SPIFFE ID \"SPIFFE://td/a\" must start with lowercase \"spiffe://\""),
            ("spiffe:///a", "SPIFFE ID \"spiffe:///a\" has no trust domain; write spiffe://TRUST-DOMAIN/PATH, e.g. spiffe://prod.example/ns/shop/sa/api"),
            ("spiffe://Prod.example/a", "'P' is not allowed in the trust domain \"Prod.example\" of SPIFFE ID \"spiffe://Prod.example/a\"; write it in lowercase: \"prod.example\""),
            ("spiffe://td:8443/a", "':' is not allowed in the trust domain \"td:8443\" of SPIFFE ID \"spiffe://td:8443/a\"; SPIFFE IDs have no port"),
            ("spiffe://*.example/a", "'*' is not allowed in the trust domain \"*.example\" of SPIFFE ID \"spiffe://*.example/a\"; the trust domain is always exact, only the path can be a pattern"),
            ("spiffe://td", "SPIFFE ID \"spiffe://td\" has no path; a workload's ID names it below the trust domain, write spiffe://TRUST-DOMAIN/PATH, e.g. spiffe://prod.example/ns/shop/sa/api"),
            ("spiffe://td/", "SPIFFE ID \"spiffe://td/\" has no path; a workload's ID names it below the trust domain, write spiffe://TRUST-DOMAIN/PATH, e.g. spiffe://prod.example/ns/shop/sa/api"),
            ("spiffe://td/a/", "SPIFFE ID \"spiffe://td/a/\" ends with '/'; remove the trailing '/'"),
            ("spiffe://td/a//b", "SPIFFE ID \"spiffe://td/a//b\" has an empty path segment (\"//\"); remove the extra '/'"),
            ("spiffe://td/a/../b", "SPIFFE ID \"spiffe://td/a/../b\" has a \"..\" path segment, which SPIFFE IDs do not allow; remove it"),
            ("spiffe://td/a?x=1", "SPIFFE ID \"spiffe://td/a?x=1\" has a query (\"?x=1\"); SPIFFE IDs have none, remove it"),
            ("spiffe://td/a#frag", "SPIFFE ID \"spiffe://td/a#frag\" has a fragment (\"#frag\"); SPIFFE IDs have none, remove it"),
            ("spiffe://td/a%20b", "'%' is not allowed in the path of SPIFFE ID \"spiffe://td/a%20b\" (SPIFFE IDs are never percent-encoded); use letters, digits, '.', '_' and '-' (and '*' in patterns)"),
            ("spiffe://td/a b", "' ' is not allowed in the path of SPIFFE ID \"spiffe://td/a b\"; use letters, digits, '.', '_' and '-' (and '*' in patterns)"),
            ("spiffe://td/ns/a**", "SPIFFE pattern \"spiffe://td/ns/a**\" has \"**\" inside the segment \"a**\"; \"**\" must be a whole segment (as in spiffe://td/ns/**), use \"*\" to match within a segment"),
        ];
        for (text, expected) in cases {
            assert_eq!(spiffe_error(text), expected, "{text}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2048 - 12));
        assert_eq!(long.len(), 2048);
        assert!(SpiffeSelector::parse(&long).is_ok());
        assert_eq!(spiffe_error(&format!("{long}b")), "SPIFFE ID is 2049 bytes long; use at most 2048");
    }

    #[test]
    fn spiffe_patterns_match_within_and_across_segments() {
        let matcher = spiffes(&[
            ("spiffe://prod.example/ns/shop/sa/api", "api", 1),
            ("spiffe://prod.example/ns/shop/sa/*", "shop", 2),
            ("spiffe://prod.example/ns/*/sa/api-*", "apis", 3),
            ("spiffe://prod.example/**", "prod", 4),
        ]);
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/api"), Some(1));
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/web"), Some(2));
        // 3 literal segments (ns, shop, sa) beat 2 (ns, sa).
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/api-v2"), Some(2));
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/bank/sa/api-v2"), Some(3));
        // `*` stays within its segment; `**` spans segments.
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/web/extra"), Some(4));
        assert_eq!(matcher.identity_of("spiffe://prod.example/x"), Some(4));
        // The trust domain is exact, and invalid IDs match nothing even where `**` would.
        assert_eq!(matcher.identity_of("spiffe://staging.example/ns/shop/sa/api"), None);
        assert_eq!(matcher.identity_of("spiffe://prod.example.evil/ns/shop/sa/api"), None);
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/../admin"), None);
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/api?x"), None);
        assert_eq!(matcher.identity_of("spiffe://prod.example/ns/shop/sa/api/"), None);
        assert_eq!(matcher.identity_of("spiffe://prod.example"), None);
        assert!(SpiffeMatcher::default().is_empty());
        // As many literal segments: more literal characters win, then the first name.
        let matcher = spiffes(&[
            ("spiffe://td/ns/*/sa/*", "b-any", 1),
            ("spiffe://td/ns/*/sa/web-*", "c-web", 2),
            ("spiffe://td/ns/shop-*/sa/*", "a-shop", 3),
        ]);
        assert_eq!(matcher.identity_of("spiffe://td/ns/bank/sa/db"), Some(1));
        assert_eq!(matcher.identity_of("spiffe://td/ns/bank/sa/web-1"), Some(2));
        assert_eq!(matcher.identity_of("spiffe://td/ns/shop-1/sa/db"), Some(3));
        // "c-web" and "a-shop" have 2 literal segments and as many characters: "a-shop" wins.
        assert_eq!(matcher.identity_of("spiffe://td/ns/shop-1/sa/web-1"), Some(3));
    }

    #[test]
    fn interface_names_follow_linux_rules() {
        for name in ["lxc-api", "eth0", "a", "veth1234567890a", "br.100", "wg_0"] {
            assert_eq!(check_interface_name(name), Ok(()), "{name}");
        }
        assert_eq!(
            check_interface_name("veth1234567890ab"),
            Err("interface name \"veth1234567890ab\" is 16 bytes long; Linux interface names have at most 15".into())
        );
        assert!(check_interface_name("").unwrap_err().starts_with("interface name is empty"));
        assert!(check_interface_name("..").unwrap_err().starts_with("\"..\" is not a valid interface name"));
        assert!(check_interface_name(".").is_err());
        assert_eq!(
            check_interface_name("eth0:1"),
            Err("':' is not allowed in an interface name (\"eth0:1\"); Linux interface names have no '/', ':' or whitespace".into())
        );
        assert!(check_interface_name("a/b").unwrap_err().starts_with("'/' is not allowed"));
        assert!(check_interface_name("a b").unwrap_err().starts_with("' ' is not allowed"));
        assert!(check_interface_name("a\tb").unwrap_err().starts_with("'\\t' is not allowed"));
        // Bytes, not characters: 8 two-byte characters are 16 bytes.
        assert!(check_interface_name(&"é".repeat(8)).unwrap_err().contains("16 bytes long"));
    }
}
