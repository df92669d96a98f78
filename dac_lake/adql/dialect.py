"""The ADQL dialect for sqlglot, and `parse_adql`, the only way user text becomes an AST.

ADQL is SQL-92 plus TOP, OFFSET, hex literals, optional bitwise operators, ILIKE and geometry functions.
The dialect is deliberately narrower than sqlglot's default:

- every function call parses to `exp.Anonymous` (no function-specific parsers except CAST), so the
  translator sees the name the user wrote and can check it against ADQL's allow-list instead of relying
  on sqlglot's idea of what e.g. `LOG` means;
- strings use only single quotes with '' escaping (no E'', $$, x'', r''); identifiers use only "";
- tokens of other dialects (`::`, `[`, `{`, `$1`, `?`, `->`, `**`, ...) are rejected with their position
  before parsing, so the error message names the construct instead of a confusing parse failure;
- size limits (length, tokens, parenthesis depth) are enforced before the recursive-descent parser runs,
  because Python recursion is the parser's stack.
"""

from __future__ import annotations

import re
import typing as t

import sqlglot
from sqlglot import exp, parser, tokens
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Token, TokenType

from .errors import AdqlSyntaxError, AdqlTooComplex, AdqlUnsupported, position

MAX_QUERY_CHARS = 200_000
MAX_TOKENS = 60_000
MAX_PAREN_DEPTH = 40

# Tokens that only other SQL dialects produce: rejected with a message naming the construct.
_FOREIGN_TOKENS: dict[TokenType, str] = {
    TokenType.DCOLON: "the '::' cast operator is not ADQL; use CAST(x AS type)",
    TokenType.L_BRACKET: "'[' is not ADQL",
    TokenType.R_BRACKET: "']' is not ADQL",
    TokenType.L_BRACE: "'{' is not ADQL",
    TokenType.R_BRACE: "'}' is not ADQL",
    TokenType.COLON: "':' is not ADQL",
    TokenType.PLACEHOLDER: "query parameters ('?') are not ADQL",
    TokenType.PARAMETER: "query parameters are not ADQL",
    TokenType.DOLLAR: "'$' is not ADQL",
    TokenType.HASH: "'#' is not ADQL",
    TokenType.ARROW: "'->' is not ADQL",
    TokenType.DARROW: "'->>' is not ADQL",
    TokenType.FARROW: "'=>' is not ADQL",
    TokenType.DSTAR: "'**' is not ADQL; use POWER(x, y)",
    TokenType.LIMIT: "LIMIT is not ADQL; use SELECT TOP n",
    TokenType.BACKSLASH: "'\\' is not ADQL",
}
for _name in (
    "HASH_ARROW",
    "DHASH_ARROW",
    "LR_ARROW",
    "DAT",
    "LT_AT",
    "AT_GT",
    "DQMARK",
    "COLON_EQ",
    "DPIPE_SLASH",
    "PIPE_SLASH",
    "CARET_AT",
    "QMARK_AMP",
    "QMARK_PIPE",
    "HASH_DASH",
    "AT",
    "NULLSAFE_EQ",
    "DCOLONDOLLAR",
    "DCOLONPERCENT",
    "DCOLONQMARK",
    "PIPE_GT",
    "DOTCOLON",
    "STRING_CONCAT_OP",
):
    _tt = getattr(TokenType, _name, None)
    if _tt is not None:
        _FOREIGN_TOKENS.setdefault(_tt, f"the operator '{_name.lower()}' is not ADQL")


class ADQL(Dialect):
    """sqlglot dialect for ADQL 2.1 (parsing only: generation always targets DuckDB)."""

    LOG_DEFAULTS_TO_LN = True
    NULL_ORDERING = "nulls_are_last"
    TYPED_DIVISION = True

    class Tokenizer(tokens.Tokenizer):
        QUOTES: t.ClassVar = ["'"]
        IDENTIFIERS: t.ClassVar = ['"']
        STRING_ESCAPES: t.ClassVar = ["'"]
        IDENTIFIER_ESCAPES: t.ClassVar = ['"']
        HEX_STRINGS: t.ClassVar = [("0x", ""), ("0X", "")]
        BIT_STRINGS: t.ClassVar[list] = []
        BYTE_STRINGS: t.ClassVar[list] = []
        RAW_STRINGS: t.ClassVar[list] = []
        HEREDOC_STRINGS: t.ClassVar[list] = []
        UNICODE_STRINGS: t.ClassVar[list] = []
        COMMENTS: t.ClassVar = ["--", ("/*", "*/")]
        KEYWORDS: t.ClassVar = {**tokens.Tokenizer.KEYWORDS, "TOP": TokenType.TOP, "ILIKE": TokenType.ILIKE}

    class Parser(parser.Parser):
        FUNCTIONS: t.ClassVar[dict] = {}
        NO_PAREN_FUNCTIONS: t.ClassVar[dict] = {}
        FUNCTION_PARSERS: t.ClassVar = {"CAST": parser.Parser.FUNCTION_PARSERS["CAST"]}
        NO_PAREN_FUNCTION_PARSERS: t.ClassVar = {"CASE": parser.Parser.NO_PAREN_FUNCTION_PARSERS["CASE"]}

        def _parse_string_as_identifier(self) -> exp.Identifier | None:
            # `FROM 'file.parquet'` must not become a table name: ADQL has no string identifiers.
            return None

        def raise_error(self, message: str, token: Token | None = None) -> None:
            token = token or self._curr or self._prev
            text = self.sql or ""
            if token is None or token.token_type == TokenType.SENTINEL:
                line, col = position(text, len(text.rstrip()))
            else:
                line, col = position(text, token.start)
            raise AdqlSyntaxError(f"syntax error: {_readable(message)}", line, col)


def _readable(message: str) -> str:
    """sqlglot messages embed token reprs; show the token text instead."""
    message = re.sub(r"<Token token_type: TokenType\.SENTINEL[^>]*>", "the end of the query", message)
    return re.sub(r"<Token token_type: [^,]*, text: (.*?), line: \d+[^>]*>", r"'\1'", message)


def tokenize(text: str) -> list[Token]:
    """Tokenize with the ADQL tokenizer, mapping tokenizer failures to `AdqlSyntaxError`."""
    try:
        return ADQL().tokenize(text)
    except TokenError as err:
        raise AdqlSyntaxError(f"syntax error: {err}") from None


def _check_tokens(text: str, toks: list[Token]) -> None:
    if len(toks) > MAX_TOKENS:
        raise AdqlTooComplex(f"query too long: {len(toks)} tokens (limit {MAX_TOKENS})")
    depth = 0
    for i, tok in enumerate(toks):
        tt = tok.token_type
        if tt in _FOREIGN_TOKENS:
            raise AdqlSyntaxError(_FOREIGN_TOKENS[tt], *position(text, tok.start))
        if tt == TokenType.L_PAREN:
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                raise AdqlTooComplex(
                    f"parentheses nested deeper than {MAX_PAREN_DEPTH} levels", *position(text, tok.start)
                )
        elif tt == TokenType.R_PAREN:
            depth -= 1
        elif tt == TokenType.SEMICOLON and i != len(toks) - 1:
            raise AdqlUnsupported(
                "only one statement is allowed (found ';' before the end)", *position(text, tok.start)
            )
        elif (
            tt == TokenType.VAR
            and i + 1 < len(toks)
            and toks[i + 1].token_type == TokenType.STRING
            and tok.text.upper() != "TIMESTAMP"
        ):
            # typed string literals of other dialects: DATE 'x', E'x', N'x', ...
            raise AdqlSyntaxError(f"unexpected string after '{tok.text}'", *position(text, tok.start))


def parse_adql(text: str) -> exp.Expr:
    """Parse one ADQL query into a sqlglot AST, or raise an `AdqlError` subclass."""
    if not isinstance(text, str):
        raise AdqlSyntaxError("the query must be text")
    if len(text) > MAX_QUERY_CHARS:
        raise AdqlTooComplex(f"query too long: {len(text)} characters (limit {MAX_QUERY_CHARS})")
    if "\x00" in text:
        raise AdqlSyntaxError("the query contains a NUL character", *position(text, text.index("\x00")))
    if not text.strip():
        raise AdqlSyntaxError("empty query")
    toks = tokenize(text)
    _check_tokens(text, toks)
    if not toks or (len(toks) == 1 and toks[0].token_type == TokenType.SEMICOLON):
        raise AdqlSyntaxError("empty query")
    if toks[0].token_type not in (TokenType.SELECT, TokenType.WITH, TokenType.L_PAREN):
        raise AdqlUnsupported(
            f"only SELECT queries are allowed (the query starts with '{toks[0].text}')",
            *position(text, toks[0].start),
        )
    try:
        trees = ADQL().parser().parse(toks, text)
    except AdqlSyntaxError:
        raise
    except ParseError as err:  # pragma: no cover - raise_error above normally fires first
        info = err.errors[0] if err.errors else {}
        raise AdqlSyntaxError(f"syntax error: {info.get('description') or err}") from None
    except RecursionError:
        raise AdqlTooComplex("query nested too deeply") from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise AdqlUnsupported("exactly one statement is allowed")
    return trees[0]


__all__ = ["ADQL", "MAX_PAREN_DEPTH", "MAX_QUERY_CHARS", "parse_adql", "sqlglot"]
