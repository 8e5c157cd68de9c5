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
                    "ignore" => opts.ignore = strings(&meta)?,
                    "sensitive" => opts.sensitive = strings(&meta)?,
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
    let mut id_field = None;
    let mut field_names = Vec::new();
    let mut sensitive: Vec<String> = opts.sensitive.iter().map(LitStr::value).collect();
    let mut ignore: Vec<String> = opts.ignore.iter().map(LitStr::value).collect();
    for field in &data.fields {
        let Some(ident) = &field.ident else {
            return Err(syn::Error::new_spanned(
                field,
                "#[derive(Audited)] needs named fields: they are the columns",
            ));
        };
        field_names.push(ident.to_string());
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("audited")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("id") {
                    id_field = Some(ident.clone());
                } else if meta.path.is_ident("sensitive") {
                    sensitive.push(ident.to_string());
                } else if meta.path.is_ident("ignore") {
                    ignore.push(ident.to_string());
                } else {
                    return Err(meta.error("field attributes are `id`, `sensitive` and `ignore`"));
                }
                Ok(())
            })?;
        }
    }
    for declaration in &declarations {
        for attribute in &declaration.attributes {
            if !field_names.contains(&attribute.to_string()) {
                return Err(syn::Error::new_spanned(
                    attribute,
                    format!(
                        "journal_changes_to: `{}` has no field `{attribute}`",
                        input.ident
                    ),
                ));
            }
        }
    }
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
    let changes = declarations.iter().map(|d| {
        let attributes: Vec<String> = d.attributes.iter().map(ToString::to_string).collect();
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
