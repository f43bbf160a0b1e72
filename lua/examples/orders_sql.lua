-- orders_sql: stores an order and its lines in one transaction. Invalid input is
-- a 400; a statement error rolls everything back and becomes the error reply.
--   agent-block dev lua/examples/orders_sql.lua --sql-url sqlite://orders.db
--   agent-block request orders.place '{"customer":"ada","lines":[{"sku":"tea","qty":2}]}' \
--     --nats-url <printed URL>
-- (SQLite placeholders; with PostgreSQL write $1, $2 and `returning id`.)

sql.exec([[create table if not exists orders(
  id integer primary key, customer text not null, created_at text default current_timestamp)]])
sql.exec([[create table if not exists order_lines(
  order_id integer not null references orders(id), sku text not null, qty integer not null)]])

bus.subscribe("orders.place")

bus.on("orders.place", function(ev)
  local order = ev.payload
  if type(order.customer) ~= "string" or type(order.lines) ~= "table" or #order.lines == 0 then
    error({ code = 400, message = "expected {customer, lines = [{sku, qty}]}" })
  end
  local id = sql.transaction(function(tx)
    local order_id = tx.exec("insert into orders(customer) values (?)", { order.customer }).last_id
    for _, line in ipairs(order.lines) do
      if math.type(line.qty) ~= "integer" or line.qty < 1 then
        error({ code = 400, message = "qty must be a positive integer" })
      end
      tx.exec("insert into order_lines(order_id, sku, qty) values (?, ?, ?)", { order_id, line.sku, line.qty })
    end
    return order_id
  end)
  return { id = id }
end)
