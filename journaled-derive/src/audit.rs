//! `#[derive(Audited)]`.

use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::parse::ParseStream;
use syn::{Data, DeriveInput, Expr, Ident, LitStr, Path, Token};

use crate::{parse_path, snake_case};

#[derive(Default)]
struct Options {
    table: Option<LitStr>,
    class_name: Option<LitStr>,
    ignore: Vec<LitStr>,
    sensitive: Vec<LitStr>,
    stream: Option<LitStr>,
    priority: Option<Expr>,
    skip_audit_log: bool,
    krate: Option<Path>,
}

struct Declaration {
    attributes: Vec<Ident>,
    logical_operation: LitStr,
    tagged: bool,
}

fn strings(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Vec<LitStr>> {
    let value = meta.value()?;
    let content;
    syn::bracketed!(content in value);
    let list = content.parse_terminated(|input: ParseStream| input.parse::<LitStr>(), Token![,])?;
    Ok(list.into_iter().collect())
}

fn declaration(input: ParseStream) -> syn::Result<Declaration> {
    let mut attributes = Vec::new();
    let mut logical_operation = None;
    let mut tagged = false;
    while !input.is_empty() {
        if input.peek(Token![as]) {
            input.parse::<Token![as]>()?;
            input.parse::<Token![=]>()?;
            logical_operation = Some(input.parse::<LitStr>()?);
        } else {
            let ident: Ident = input.parse()?;
            if ident == "tagged" {
                tagged = true;
            } else {
                attributes.push(ident);
            }
        }
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    let logical_operation = logical_operation
        .ok_or_else(|| input.error("journal_changes_to needs `as = \"logical_operation\"`"))?;
    if attributes.is_empty() {
        return Err(syn::Error::new(
            logical_operation.span(),
            "journal_changes_to needs at least one attribute",
        ));
    }
    Ok(Declaration {
        attributes,
        logical_operation,
        tagged,
    })
}

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let mut opts = Options::default();
    let mut declarations = Vec::new();
    for attr in &input.attrs {
        if attr.path().is_ident("audited") {
            attr.parse_nested_meta(|meta| {
                let key = meta
                    .path
                    .get_ident()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                match key.as_str() {
                    "table" => opts.table = Some(meta.value()?.parse()?),
                    "class_name" => opts.class_name = Some(meta.value()?.parse()?),
                    "ignore" => opts.ignore.extend(strings(&meta)?),
                    "sensitive" => opts.sensitive.extend(strings(&meta)?),
                    "stream" => opts.stream = Some(meta.value()?.parse()?),
                    "priority" => opts.priority = Some(meta.value()?.parse()?),
                    "skip_audit_log" => opts.skip_audit_log = true,
                    "crate" => opts.krate = Some(parse_path(&meta)?),
                    _ => {
                        return Err(meta.error(format!(
                            "unknown audited attribute `{key}`; expected one of table, class_name, \
                             ignore, sensitive, stream, priority, skip_audit_log, crate"
                        )));
                    }
                }
                Ok(())
            })?;
        } else if attr.path().is_ident("journal_changes_to") {
            declarations.push(attr.parse_args_with(declaration)?);
        }
    }
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(Audited)] supports structs only",
        ));
    };
    let rename_all = serde_rename_all(&input.attrs)?;
    let mut id_field = None;
    // (Rust field name, column name as serialized) of every serialized field.
    let mut columns: Vec<(String, String)> = Vec::new();
    let mut sensitive: Vec<String> = Vec::new();
    let mut ignore: Vec<String> = Vec::new();
    for field in &data.fields {
        let Some(ident) = &field.ident else {
            return Err(syn::Error::new_spanned(
                field,
                "#[derive(Audited)] needs named fields: they are the columns",
            ));
        };
        let column = match serde_field(field)? {
            SerdeField::Skipped => None,
            SerdeField::Renamed(name) => Some(name),
            SerdeField::Plain => Some(apply_rename_all(rename_all.as_deref(), &ident.to_string())),
        };
        if let Some(column) = &column {
            columns.push((ident.to_string(), column.clone()));
        }
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("audited")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("id") {
                    id_field = Some(ident.clone());
                    return Ok(());
                }
                let list = if meta.path.is_ident("sensitive") {
                    &mut sensitive
                } else if meta.path.is_ident("ignore") {
                    &mut ignore
                } else {
                    return Err(meta.error("field attributes are `id`, `sensitive` and `ignore`"));
                };
                match &column {
                    Some(column) => list.push(column.clone()),
                    None => return Err(meta.error("this field is not serialized: it is no column")),
                }
                Ok(())
            })?;
        }
    }
    let column_of = |field: &str| {
        columns
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, c)| c.clone())
    };
    for lit in opts.sensitive.iter().chain(&opts.ignore) {
        if !columns.iter().any(|(_, c)| *c == lit.value()) {
            return Err(syn::Error::new_spanned(
                lit,
                format!("`{}` has no column `{}`", input.ident, lit.value()),
            ));
        }
    }
    sensitive.extend(opts.sensitive.iter().map(LitStr::value));
    ignore.extend(opts.ignore.iter().map(LitStr::value));
    let mut watched: Vec<Vec<String>> = Vec::new();
    for declaration in &declarations {
        let mut attributes = Vec::new();
        for attribute in &declaration.attributes {
            match column_of(&attribute.to_string()) {
                Some(column) => attributes.push(column),
                None => {
                    return Err(syn::Error::new_spanned(
                        attribute,
                        format!(
                            "journal_changes_to: `{}` has no serialized field `{attribute}`",
                            input.ident
                        ),
                    ));
                }
            }
        }
        watched.push(attributes);
    }
    let field_names: Vec<String> = data
        .fields
        .iter()
        .filter_map(|f| f.ident.as_ref().map(ToString::to_string))
        .collect();
    let id_field = match id_field {
        Some(field) => field,
        None if field_names.iter().any(|f| f == "id") => {
            Ident::new("id", proc_macro2::Span::call_site())
        }
        None => {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "no record id: add a field `id` or mark one #[audited(id)]",
            ));
        }
    };

    let krate = opts
        .krate
        .clone()
        .map(|p| quote!(#p))
        .unwrap_or_else(|| quote!(::journaled));
    let name = &input.ident;
    let class_name = opts
        .class_name
        .as_ref()
        .map(LitStr::value)
        .unwrap_or_else(|| name.to_string());
    let table = opts
        .table
        .as_ref()
        .map(LitStr::value)
        .unwrap_or_else(|| format!("{}s", snake_case(&name.to_string())));
    let audit_log = !opts.skip_audit_log;
    let changes = declarations.iter().zip(&watched).map(|(d, attributes)| {
        let operation = &d.logical_operation;
        let tagged = d.tagged;
        quote! {
            #krate::audit::ChangeDeclaration {
                logical_operation: #operation,
                attributes: &[#(#attributes),*],
                tagged: #tagged,
            }
        }
    });
    let stream = opts.stream.as_ref().map(|lit| {
        quote! {
            fn audit_stream(&self) -> ::core::option::Option<::std::borrow::Cow<'_, str>> {
                ::core::option::Option::Some(::std::borrow::Cow::Borrowed(#lit))
            }
        }
    });
    let priority = opts.priority.as_ref().map(|expr| {
        quote! {
            fn audit_priority(&self) -> ::core::option::Option<i32> { ::core::option::Option::Some(#expr) }
        }
    });
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics #krate::audit::Audited for #name #ty_generics #where_clause {
            const CLASS_NAME: &'static str = #class_name;
            const TABLE_NAME: &'static str = #table;
            const IGNORED_COLUMNS: &'static [&'static str] = &[#(#ignore),*];
            const SENSITIVE_COLUMNS: &'static [&'static str] = &[#(#sensitive),*];
            const AUDIT_LOG: bool = #audit_log;
            const CHANGES: &'static [#krate::audit::ChangeDeclaration] = &[#(#changes),*];
            fn record_id(&self) -> ::std::string::String {
                ::std::string::ToString::to_string(&self.#id_field)
            }
            #stream
            #priority
        }
    })
}

enum SerdeField {
    Plain,
    Renamed(String),
    Skipped,
}

/// Skips the value of a serde attribute this macro does not need.
fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<TokenStream2>()?;
    }
    Ok(())
}

/// The column a field serializes to: its `#[serde(rename)]`, skipped, or plain.
fn serde_field(field: &syn::Field) -> syn::Result<SerdeField> {
    let mut out = SerdeField::Plain;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                if meta.input.peek(Token![=]) {
                    out = SerdeField::Renamed(meta.value()?.parse::<LitStr>()?.value());
                } else {
                    return Err(meta.error("#[derive(Audited)] supports `rename = \"…\"` only"));
                }
            } else if meta.path.is_ident("skip") || meta.path.is_ident("skip_serializing") {
                out = SerdeField::Skipped;
            } else if meta.path.is_ident("flatten") {
                return Err(
                    meta.error("#[derive(Audited)] cannot see the columns of a flattened field")
                );
            } else {
                skip_value(&meta)?;
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// The container's `#[serde(rename_all = "…")]`, if any.
fn serde_rename_all(attrs: &[syn::Attribute]) -> syn::Result<Option<String>> {
    let mut out = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename_all") {
                if !meta.input.peek(Token![=]) {
                    return Err(meta.error("#[derive(Audited)] supports `rename_all = \"…\"` only"));
                }
                let rule = meta.value()?.parse::<LitStr>()?;
                if apply_rename_all_checked(&rule.value(), "a_b").is_none() {
                    return Err(syn::Error::new_spanned(rule, "unknown rename_all rule"));
                }
                out = Some(rule.value());
            } else {
                skip_value(&meta)?;
            }
            Ok(())
        })?;
    }
    Ok(out)
}

fn apply_rename_all(rule: Option<&str>, field: &str) -> String {
    rule.and_then(|r| apply_rename_all_checked(r, field))
        .unwrap_or_else(|| field.to_owned())
}

/// serde's rename rules, applied to a snake_case field name.
fn apply_rename_all_checked(rule: &str, field: &str) -> Option<String> {
    let capitalize = |w: &str| {
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
            .unwrap_or_default()
    };
    let words: Vec<&str> = field.split('_').collect();
    Some(match rule {
        "lowercase" => field.to_lowercase(),
        "UPPERCASE" => field.to_uppercase(),
        "PascalCase" => words.iter().map(|w| capitalize(w)).collect(),
        "camelCase" => {
            let pascal: String = words.iter().map(|w| capitalize(w)).collect();
            let mut c = pascal.chars();
            c.next()
                .map(|f| f.to_lowercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
        "snake_case" => field.to_owned(),
        "SCREAMING_SNAKE_CASE" => field.to_uppercase(),
        "kebab-case" => field.replace('_', "-"),
        "SCREAMING-KEBAB-CASE" => field.replace('_', "-").to_uppercase(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::apply_rename_all_checked as rule;

    #[test]
    fn serde_rename_rules() {
        assert_eq!(rule("camelCase", "first_name").unwrap(), "firstName");
        assert_eq!(rule("PascalCase", "first_name").unwrap(), "FirstName");
        assert_eq!(rule("kebab-case", "first_name").unwrap(), "first-name");
        assert_eq!(
            rule("SCREAMING_SNAKE_CASE", "first_name").unwrap(),
            "FIRST_NAME"
        );
        assert!(rule("Title Case", "x").is_none());
    }
}
