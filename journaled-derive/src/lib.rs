//! `#[derive(Event)]` for the [`journaled`](https://docs.rs/journaled) crate.
//!
//! The logic is deliberately thin: it reads `#[journaled(...)]` attributes and writes an
//! `impl journaled::Event`. Everything that can live in a normal library lives in `journaled`.

mod audit;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::{Data, DeriveInput, Expr, Fields, LitStr, Path, parse_macro_input};

/// Derives `journaled::Event` for a struct whose serde fields are the journaled attributes.
///
/// Container attributes, all optional, inside `#[journaled(...)]`:
/// - `event_type = "name"`: defaults to the snake_case type name.
/// - `tagged`: the event carries the task-local tags (`tags` field) and is validated against
///   the built-in `tagged_event` schema too.
/// - `ordered`: delivered in commit order per (stream, partition key), with a gap-free
///   `sequence` in the envelope (see `Event::ORDERED`).
/// - `stream = "name"` or `stream_with = path::to::fn` (`fn(&Self) -> impl Into<Cow<str>>`).
/// - `partition_key_with = path::to::fn`, or `#[journaled(partition_key)]` on a field whose
///   value (`Display`) becomes the partition key. Default: the event id.
/// - `priority = 10` or `priority_with = path::to::fn` (`fn(&Self) -> i32`); lower runs first.
/// - `delay_secs = 30` or `run_at_with = path::to::fn` (`fn(&Self) -> Option<journaled::RunAt>`).
/// - `crate = path`: where the `journaled` crate is, when it is renamed (default `::journaled`).
#[proc_macro_derive(Event, attributes(journaled))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

/// Derives `journaled::audit::Audited` for a struct whose serde fields are its columns.
///
/// Container attributes:
/// - `#[audited(table = "users", class_name = "User", ignore = ["last_synced_at"],
///   sensitive = ["ssn"], stream = "name", priority = 30, skip_audit_log)]`, all optional
///   (table defaults to the snake_case type name plus `s`; class name to the type name).
/// - `#[journal_changes_to(email, first_name, as = "identity_change")]`, repeatable, with an
///   optional `tagged`; naming a field the struct does not have is a compile error.
///
/// Field attributes: `#[audited(id)]` (the record id; default the field `id`),
/// `#[audited(sensitive)]`, `#[audited(ignore)]`.
#[proc_macro_derive(Audited, attributes(audited, journal_changes_to))]
pub fn derive_audited(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match audit::expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Options {
    event_type: Option<LitStr>,
    tagged: bool,
    ordered: bool,
    stream: Option<LitStr>,
    stream_with: Option<Path>,
    partition_key_with: Option<Path>,
    priority: Option<Expr>,
    priority_with: Option<Path>,
    delay_secs: Option<Expr>,
    run_at_with: Option<Path>,
    krate: Option<Path>,
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let mut opts = Options::default();
    for attr in input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("journaled"))
    {
        attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            match key.as_str() {
                "event_type" => opts.event_type = Some(meta.value()?.parse()?),
                "tagged" => opts.tagged = true,
                "ordered" => opts.ordered = true,
                "stream" => opts.stream = Some(meta.value()?.parse()?),
                "stream_with" => opts.stream_with = Some(parse_path(&meta)?),
                "partition_key_with" => opts.partition_key_with = Some(parse_path(&meta)?),
                "priority" => opts.priority = Some(meta.value()?.parse()?),
                "priority_with" => opts.priority_with = Some(parse_path(&meta)?),
                "delay_secs" => opts.delay_secs = Some(meta.value()?.parse()?),
                "run_at_with" => opts.run_at_with = Some(parse_path(&meta)?),
                "crate" => opts.krate = Some(parse_path(&meta)?),
                _ => {
                    return Err(meta.error(format!(
                        "unknown journaled attribute `{key}`; expected one of event_type, tagged, \
                         ordered, stream, stream_with, partition_key_with, priority, priority_with, \
                         delay_secs, run_at_with, crate"
                    )));
                }
            }
            Ok(())
        })?;
    }
    conflict(&opts.stream, &opts.stream_with, "stream", "stream_with")?;
    conflict(
        &opts.priority,
        &opts.priority_with,
        "priority",
        "priority_with",
    )?;
    conflict(
        &opts.delay_secs,
        &opts.run_at_with,
        "delay_secs",
        "run_at_with",
    )?;

    let fields = match &input.data {
        Data::Struct(s) => &s.fields,
        _ => {
            return Err(syn::Error::new_spanned(
                &input.ident,
                "#[derive(Event)] supports structs only: their serde fields are the journaled attributes",
            ));
        }
    };
    let key_field = partition_key_field(fields)?;
    if key_field.is_some() && opts.partition_key_with.is_some() {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "use either #[journaled(partition_key)] on a field or partition_key_with, not both",
        ));
    }

    let krate = opts
        .krate
        .clone()
        .map(|p| quote!(#p))
        .unwrap_or_else(|| quote!(::journaled));
    let name = &input.ident;
    let event_type = opts
        .event_type
        .as_ref()
        .map(LitStr::value)
        .unwrap_or_else(|| snake_case(&name.to_string()));
    let tagged = opts.tagged;
    let ordered = opts.ordered;
    let cow = quote!(::std::borrow::Cow<'_, str>);

    let stream = match (&opts.stream, &opts.stream_with) {
        (Some(lit), _) => quote! {
            fn stream_name(&self) -> ::core::option::Option<#cow> {
                ::core::option::Option::Some(::std::borrow::Cow::Borrowed(#lit))
            }
        },
        (_, Some(path)) => quote! {
            fn stream_name(&self) -> ::core::option::Option<#cow> {
                ::core::option::Option::Some(::core::convert::Into::into(#path(self)))
            }
        },
        _ => quote!(),
    };
    let partition_key = match (&key_field, &opts.partition_key_with) {
        (Some(field), _) => quote! {
            fn partition_key(&self) -> ::core::option::Option<#cow> {
                ::core::option::Option::Some(::std::borrow::Cow::Owned(::std::string::ToString::to_string(&self.#field)))
            }
        },
        (_, Some(path)) => quote! {
            fn partition_key(&self) -> ::core::option::Option<#cow> {
                ::core::option::Option::Some(::core::convert::Into::into(#path(self)))
            }
        },
        _ => quote!(),
    };
    let priority = match (&opts.priority, &opts.priority_with) {
        (Some(expr), _) => quote! {
            fn priority(&self) -> ::core::option::Option<i32> { ::core::option::Option::Some(#expr) }
        },
        (_, Some(path)) => quote! {
            fn priority(&self) -> ::core::option::Option<i32> { ::core::option::Option::Some(#path(self)) }
        },
        _ => quote!(),
    };
    let run_at = match (&opts.delay_secs, &opts.run_at_with) {
        (Some(expr), _) => quote! {
            fn run_at(&self) -> ::core::option::Option<#krate::RunAt> {
                ::core::option::Option::Some(#krate::RunAt::After(::std::time::Duration::from_secs(#expr)))
            }
        },
        (_, Some(path)) => quote! {
            fn run_at(&self) -> ::core::option::Option<#krate::RunAt> { #path(self) }
        },
        _ => quote!(),
    };

    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics #krate::Event for #name #ty_generics #where_clause {
            const EVENT_TYPE: &'static str = #event_type;
            const TAGGED: bool = #tagged;
            const ORDERED: bool = #ordered;
            #stream
            #partition_key
            #priority
            #run_at
        }
    })
}

pub(crate) fn parse_path(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<Path> {
    let value = meta.value()?;
    if value.peek(LitStr) {
        let lit: LitStr = value.parse()?;
        lit.parse()
    } else {
        value.parse()
    }
}

fn conflict<A, B>(a: &Option<A>, b: &Option<B>, an: &str, bn: &str) -> syn::Result<()> {
    if a.is_some() && b.is_some() {
        return Err(syn::Error::new(
            proc_macro2::Span::call_site(),
            format!("use either `{an}` or `{bn}`, not both"),
        ));
    }
    Ok(())
}

fn partition_key_field(fields: &Fields) -> syn::Result<Option<TokenStream2>> {
    let mut found = None;
    for (index, field) in fields.iter().enumerate() {
        for attr in field
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("journaled"))
        {
            attr.parse_nested_meta(|meta| {
                if !meta.path.is_ident("partition_key") {
                    return Err(meta.error("the only journaled field attribute is `partition_key`"));
                }
                if found.is_some() {
                    return Err(meta.error("only one field can be the partition key"));
                }
                found = Some(match &field.ident {
                    Some(ident) => quote!(#ident),
                    None => {
                        let index = syn::Index::from(index);
                        quote!(#index)
                    }
                });
                Ok(())
            })?;
        }
    }
    Ok(found)
}

/// `ContractAcceptanceEvent` → `contract_acceptance_event`; `HTTPRequestSent` → `http_request_sent`.
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1).copied();
            let boundary = match prev {
                None => false,
                Some('_') => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                Some(p) => p.is_uppercase() && next.is_some_and(char::is_lowercase),
            };
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn snake_case_names() {
        assert_eq!(
            snake_case("ContractAcceptanceEvent"),
            "contract_acceptance_event"
        );
        assert_eq!(snake_case("HTTPRequestSent"), "http_request_sent");
        assert_eq!(snake_case("User2Created"), "user2_created");
        assert_eq!(snake_case("Simple"), "simple");
        assert_eq!(snake_case("Already_Snake"), "already_snake");
    }
}
